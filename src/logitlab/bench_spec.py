"""``logitlab bench --spec``: speculative decoding against plain decode, same model, same prompt, same text.

Issue 10's target: speculative decoding at least 2x plain decode on an input-grounded prompt (the model is
asked to repeat, quote or summarise a passage given in the prompt), with the same text. The prompt is the
default model's chat template around a passage of ~250 tokens; decoding is greedy, ~128 new tokens.

Both run through the engine's scheduler, the path ``logitlab generate`` and the server take: plain decode
as an ordinary request, speculative decoding as its ``SpecGroup`` mode (``decoding/speculative.py``). The
rate is tokens per second after the prefill (plain: after the first token, which the prefill yields;
speculative: after the prompt is in the cache, the last prompt token opening the first round); the
end-to-end rate (prefill included) is reported too. The prompt is run once before timing, so every timed
run finds the same prompt blocks in the prefix cache. Runs alternate (plain, then each draft, ``repeats``
times) so that a noisy neighbour slows all alike; each figure is the best of its runs and each ratio is
against the plain run of the same process.

Drafts: n-gram prompt lookup (``ngram`` = ``ngram:3``, ``ngram:N``), an int8 copy of the target
(``int8``; with ``--dtype int8`` that is the target itself), the target's first K layers
(``early-exit:K``). Per draft: tokens/s, speed-up, same text (token ids equal to plain decode's), acceptance
rate (accepted / drafted) and tokens per round (committed tokens per target verification forward).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .sampling import SamplingParams

PASSAGE = (
    "The lighthouse at Kettle Point was built in 1871 on a shelf of black rock at the mouth of the bay. "
    "For almost a century its keepers climbed one hundred and twelve steps every evening to light the lamp, "
    "wind the clockwork that turned the lens, and write the weather in a leather logbook. "
    "The logbooks survive. They record storms that tore the roof from the oil house, a winter when the bay froze "
    "so hard that the keeper's children walked to the village across the ice, and a summer night in 1903 when "
    "a schooner carrying timber ran aground on the reef because its captain mistook a fisherman's lantern for "
    "the light. In 1958 the lamp was electrified and the last keeper, Margaret Hale, left the point with her two "
    "dogs and a box of logbooks. Today the tower is a museum. Visitors can climb the steps, look through the "
    "great glass lens, and read the keepers' notes in their own handwriting: the wind, the sea, the ships that "
    "passed, and now and then a line about a birthday, a sick cow, or the first swallows of spring."
)
TASKS = {
    "repeat": "Repeat the following passage word for word:\n\n",
    "quote": "Quote the first three sentences of this passage exactly:\n\n",
    "summarise": "Summarise the following passage:\n\n",
}
DRAFTS = ("ngram", "ngram:1", "ngram:5", "int8", "early-exit:8")


def prompt_ids(engine, task: str = "repeat", passage: str = PASSAGE) -> list[int]:
    """The input-grounded prompt in the engine's chat template (plain text when the model has none)."""
    if task not in TASKS:
        raise ValueError(f"task: must be one of {', '.join(TASKS)}, got {task!r}")
    text = TASKS[task] + passage
    try:
        return engine.chat_prompt_ids([{"role": "user", "content": text}])
    except Exception:  # no chat template
        return engine.encode_prompt(text)


def _plain(engine, ids: list[int], params: SamplingParams) -> dict:
    """One plain decode through the engine's scheduler: its tokens and times."""
    sched = engine.scheduler
    (req,) = engine.make_requests(ids, params)
    t0 = time.perf_counter()
    sched.add([req])
    while not req.output_ids and not req.finished:
        sched.step()
    t1 = time.perf_counter()
    while not req.finished:
        sched.step()
    t2 = time.perf_counter()
    return {"ids": list(req.output_ids), "decode_tokens": len(req.output_ids) - 1, "decode_s": t2 - t1,
            "total_s": t2 - t0}


def _spec(engine, ids: list[int], params: SamplingParams, draft, gamma: int) -> dict:
    """One speculative decode as a mode of the engine's scheduler (as ``decoding.modes.spec_group`` sets it
    up, with a draft built once by the caller): its tokens, times and statistics."""
    from .decoding.scheduler import Request
    from .decoding.speculative import SpecGroup
    from .engine import next_group

    sched = engine.scheduler
    seed = params.seed if params.seed is not None else 0
    group = SpecGroup(ids, params, [seed], draft, gamma, sorted(engine.tokenizer.eos_token_ids),
                      engine.vocab_size, engine.max_len)
    group.requests = [Request(list(ids), params, seed, group=next_group(), index=0, spec=group)]
    req = group.requests[0]
    t0 = time.perf_counter()
    sched.add(group.requests)
    while not group.tables and not req.finished:  # admitted and prefilled: the prompt is in the cache
        sched.step()
    t1 = time.perf_counter()
    while not req.finished:
        sched.step()
    t2 = time.perf_counter()
    return {"ids": list(req.output_ids), "decode_tokens": len(req.output_ids), "decode_s": t2 - t1,
            "total_s": t2 - t0, "stats": group.stats.to_dict()}


def run_spec_bench(engine, ids: list[int], drafts=DRAFTS, max_tokens: int = 128, gamma: int | list[int] = 4,
                   repeats: int = 3) -> dict:
    """Plain greedy decode of ``ids`` against speculative decoding with each draft (spec strings or
    ``(name, Draft)`` pairs) at each ``gamma`` (drafted tokens per round; several: one entry per draft
    and gamma, named ``"DRAFT gamma=G"``), alternating, best of ``repeats``. Returns the figures and
    ratios (see the module's docstring); ``same_text`` per entry: its token ids equal plain decode's, every
    run."""
    from .decoding.speculative import make_draft

    gammas = [gamma] if isinstance(gamma, int) else list(gamma)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0)
    built = []
    for d in drafts:
        name, spec = (d, d) if isinstance(d, str) else d
        draft = make_draft(spec, engine.model)  # int8: a quantized copy, made once, untimed
        built += [(name if len(gammas) == 1 else f"{name} gamma={g}", draft, g) for g in gammas]
    ref = _plain(engine, ids, params)  # warm-up; its prompt blocks stay in the prefix cache for every timed run
    plain_runs, spec_runs = [], {name: [] for name, _, _ in built}
    for _ in range(max(1, repeats)):
        plain_runs.append(_plain(engine, ids, params))
        for name, draft, g in built:
            spec_runs[name].append(_spec(engine, ids, params, draft, g))
    tokenizer = engine.tokenizer

    def rate(r):
        return r["decode_tokens"] / r["decode_s"] if r["decode_s"] > 0 else 0.0

    def e2e(r):
        return len(r["ids"]) / r["total_s"]

    plain_tps = max(rate(r) for r in plain_runs)
    plain_e2e = max(e2e(r) for r in plain_runs)
    res = {"prompt_tokens": len(ids), "max_tokens": max_tokens, "gamma": gammas[0] if len(gammas) == 1 else gammas,
           "repeats": max(1, repeats),
           "tokens": len(ref["ids"]), "plain_tok_s": plain_tps, "plain_e2e_tok_s": plain_e2e,
           "plain_same_text_each_run": all(r["ids"] == ref["ids"] for r in plain_runs),
           "text": tokenizer.decode(ref["ids"], skip_special_tokens=True), "drafts": {}}
    for name, runs in spec_runs.items():
        best = max(runs, key=rate)
        s = best["stats"]
        tps = rate(best)
        res["drafts"][name] = {
            "spec_tok_s": tps, "speedup": tps / plain_tps if plain_tps else 0.0,
            "spec_e2e_tok_s": max(e2e(r) for r in runs),
            "e2e_speedup": max(e2e(r) for r in runs) / plain_e2e if plain_e2e else 0.0,
            "same_text": all(r["ids"] == ref["ids"] for r in runs)
            and all(tokenizer.decode(r["ids"], skip_special_tokens=True) == res["text"] for r in runs),
            "acceptance_rate": s["acceptance_rate"], "tokens_per_round": s["tokens_per_round"],
            "rounds": s["rounds"], "drafted": s["drafted"], "accepted": s["accepted"],
            "draft_forwards": s["draft_forwards"],
            "speedups_each_run": [rate(r) / rate(p) if rate(p) else 0.0 for r, p in zip(runs, plain_runs, strict=True)],
        }
    return res


def report(res: dict) -> str:
    w = max([16] + [len(n) for n in res["drafts"]])
    lines = [f"prompt {res['prompt_tokens']} tokens, {res['tokens']} generated (greedy), gamma={res['gamma']}, "
             f"best of {res['repeats']}",
             f"{'plain decode':<{w}} {res['plain_tok_s']:8.1f} tok/s   (end to end {res['plain_e2e_tok_s']:.1f})",
             "", f"{'draft':<{w}} {'tok/s':>8} {'speed-up':>9} {'e2e x':>6} {'accept':>7} {'tok/rnd':>8}  same text"]
    for name, d in res["drafts"].items():
        lines.append(f"{name:<{w}} {d['spec_tok_s']:8.1f} {d['speedup']:8.2f}x {d['e2e_speedup']:5.2f}x "
                     f"{d['acceptance_rate']:7.1%} {d['tokens_per_round']:8.2f}  {d['same_text']}")
    lines += ["", "ratios (same run):"]
    lines += [f"{'speculative ' + name + ' vs plain decode':<{w + 28}} {d['speedup']:6.2f}x"
              for name, d in res["drafts"].items()]
    return "\n".join(lines)


def _profile(engine, ids, draft_spec: str, max_tokens: int, gamma: int, top: int = 25) -> str:
    """cProfile of one speculative decode (the hot functions by own time) and where a round's time goes."""
    import cProfile
    import io
    import pstats

    from .decoding.speculative import make_draft

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0)
    draft = make_draft(draft_spec, engine.model)
    _spec(engine, ids, params, draft, gamma)
    pr = cProfile.Profile()
    pr.enable()
    _spec(engine, ids, params, draft, gamma)
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str]) -> int:
    from .weights import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="logitlab bench --spec",
                                description="speculative vs plain decode on an input-grounded prompt (same text)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8", "gguf"],
                   help="the target's dtype (default float32, as `logitlab generate`)")
    p.add_argument("--task", default="repeat", choices=sorted(TASKS))
    p.add_argument("--tokens", type=int, default=128, help="new tokens (greedy)")
    p.add_argument("--gamma", default="4", help="tokens drafted per round (--num-speculative-tokens); several, "
                   "comma-separated, give one entry per draft and gamma")
    p.add_argument("--drafts", default=",".join(DRAFTS), help="comma-separated: ngram, ngram:N, int8, early-exit:K")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--profile", default=None, metavar="DRAFT", help="also print a cProfile of one run with DRAFT")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    try:
        gammas = [int(g) for g in a.gamma.split(",") if g.strip()]
    except ValueError:
        gammas = []
    if not 1 <= a.tokens <= 4096 or not gammas or not all(1 <= g <= 64 for g in gammas) or not 1 <= a.repeats <= 100:
        raise ValueError("bench --spec: --tokens in [1, 4096], --gamma in [1, 64] (comma-separated), "
                         "--repeats in [1, 100]")
    from .engine import Engine

    torch.set_num_threads(a.threads)
    print(f"logitlab bench --spec: {a.model} dtype={a.dtype} task={a.task} threads={a.threads}", file=sys.stderr)
    engine = Engine.load(a.model, dtype=a.dtype, max_batch=4, max_len=2048)
    ids = prompt_ids(engine, a.task)
    drafts = [d.strip() for d in a.drafts.split(",") if d.strip()]
    res = {"model": a.model, "dtype": a.dtype, "task": a.task, "threads": a.threads}
    res.update(run_spec_bench(engine, ids, drafts, a.tokens, gammas, a.repeats))
    print(report(res))
    if a.profile:
        print(_profile(engine, ids, a.profile, a.tokens, gammas[0]), file=sys.stderr)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0
