"""``logitlab bench --fidelity``: how often a quantized mode's greedy text is float32's, on a corpus.

For every prompt of ``CORPUS`` the first ``--tokens`` greedy tokens of float32 (the file's weights
dequantized, nothing rounded) are the reference. Each mode counts the prompts whose tokens equal them all,
and says where the others part (the first differing token): ``--dtype gguf`` with int8 activations
(llama.cpp's rounding), with two int8 levels (``int8x2``), and llama-cpp-python on the same GGUF file fed
the same prompt ids, when it is installed. Quantized text parts from float32's at near-ties: float32's own
top-two margin goes down to 0.005 nats on this corpus, so the count says how closely each mode reproduces
the unrounded model, not how good its text is.
"""

from __future__ import annotations

import argparse
import json
import sys

# Prompts of several kinds (chat, prose, code, lists, facts). tests/test_gguf_dtype.py runs the int8x2 check
# on them.
CORPUS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n",
    "Here is a list of five fruits:\n1.",
    "The three laws of thermodynamics state that",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "The history of the Roman Empire begins",
    "To make a cup of tea, first",
    "import numpy as np\n\ndef softmax(x):\n",
    "Q: What is the largest planet in the solar system?\nA:",
    "The quick brown fox",
    "In machine learning, overfitting means",
    "<|im_start|>user\nWrite a haiku about autumn.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nHow do I reverse a list in Python?<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which",
    "My favourite recipe for pancakes is",
    "SELECT name, age FROM",
    "The first President of the United States was",
    "Dear Sir or Madam,\n\nI am writing to",
    "Water boils at 100 degrees Celsius because",
    "A triangle has three sides. A square has",
    "The mitochondria is",
    "<|im_start|>user\nTranslate 'good morning' into French.<|im_end|>\n<|im_start|>assistant\n",
    "Step 1: Preheat the oven to",
    "The meaning of life is",
    "for i in range(10):\n",
    "Shakespeare wrote many plays, including",
    "The stock market crashed in 1929 because",
    "Cats are popular pets because",
    "<|im_start|>user\nWhat is 12 times 12?<|im_end|>\n<|im_start|>assistant\n",
]


def greedy(engine, prompts: list, tokens: int) -> list[list[int]]:
    from .sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    return [out.choices[0].token_ids for out in engine.generate(prompts, params)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The index of the first token where a and b differ, None where they agree throughout."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def _llamacpp_greedy(path: str, prompts: list[list[int]], tokens: int) -> list[list[int]] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=512, verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        got = []
        for _ in range(tokens):
            got.append(int(llm.sample(temp=0.0)))
            llm.eval([got[-1]])
        out.append(got)
    return out


def run(model: str, tokens: int) -> dict:
    from .engine import Engine
    from .model.gguf_model import set_activations
    from .weights import resolve_model

    ref_engine = Engine.load(model, max_batch=8, max_len=512)
    ids = [ref_engine.encode_prompt(p) for p in CORPUS]
    want = greedy(ref_engine, ids, tokens)
    del ref_engine
    modes = {}
    engine = Engine.load(model, dtype="gguf", max_batch=8, max_len=512)
    for activations in ("int8", "int8x2"):
        set_activations(engine.model, activations)
        modes[f"gguf {activations}"] = greedy(engine, ids, tokens)
    src = str(resolve_model(model))
    lc = _llamacpp_greedy(src, ids, tokens) if src.endswith(".gguf") else None
    if lc is not None:
        modes["llama.cpp"] = lc
    res = {"model": model, "tokens": tokens, "prompts": len(CORPUS)}
    for name, got in modes.items():
        parts = [first_difference(a, b) for a, b in zip(got, want, strict=True)]
        res[name] = {"equal": sum(p is None for p in parts), "first_difference": parts}
    return res


def main(argv: list[str] | None = None) -> int:
    from .weights import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="logitlab bench --fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens compared per prompt")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.tokens < 1:
        raise ValueError("bench: --tokens must be at least 1")
    print(f"logitlab bench --fidelity: {args.model}, {len(CORPUS)} prompts, {args.tokens} greedy tokens",
          file=sys.stderr)
    res = run(args.model, args.tokens)
    for name in (k for k in res if isinstance(res[k], dict)):
        parts = [p for p in res[name]["first_difference"] if p is not None]
        print(f"{name:<12} equal to float32 on {res[name]['equal']:>2} of {res['prompts']} prompts"
              + (f"; the others part at tokens {sorted(parts)}" if parts else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0
