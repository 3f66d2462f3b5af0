"""The training state on disk, without pickle: safetensors for tensors, JSON for the rest.

    OUT/train_config.json                   marks OUT as a logitlab training directory (the run's settings)
    OUT/train_state/latest.json             {"step": N, "dir": "step-0000000N"}: the commit point
    OUT/train_state/step-0000000N/          model.safetensors (our parameter names), optimizer.safetensors
                                            (AdamW moments by parameter name), rng.safetensors, state.json

A checkpoint is written into a temporary folder, renamed into place, and only then made current by
replacing latest.json (``os.replace`` is atomic), after which older step folders are removed. A run
interrupted anywhere in between leaves the previous checkpoint current and whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MARKER = "train_config.json"
STATE_DIR = "train_state"
LATEST = "latest.json"
FORMAT = 1


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared model directory from its other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_training_dir(out: Path) -> bool:
    try:
        return json.loads((out / MARKER).read_text()).get("logitlab_train") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out: Path) -> None:
    """OUT may be new, empty, or a logitlab training directory; anything else is not ours to overwrite."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_training_dir(out):
        raise ValueError(f"out: {out} is not empty and is not a logitlab training directory; choose another --out")


def write_marker(out: Path, settings: dict) -> None:
    atomic_write_text(out / MARKER, json.dumps({"logitlab_train": FORMAT, **settings}, indent=2) + "\n")


def latest_step(out: Path) -> int | None:
    try:
        return int(json.loads((out / STATE_DIR / LATEST).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_state(out: Path) -> None:
    """A fresh run in an old training directory: forget the old run's checkpoints."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _untie(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: drop the tied LM head (re-tied on load)."""
    sd = dict(sd)
    head, emb = sd.get("lm_head.weight"), sd.get("model.embed_tokens.weight")
    if head is not None and emb is not None and head.data_ptr() == emb.data_ptr():
        del sd["lm_head.weight"]
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, list]:
    """AdamW's per-parameter state keyed by parameter name (``name::exp_avg``), and the groups' settings."""
    tensors, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params"} | {"params": [names[id(p)] for p in
                                                                                    group["params"]]})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"{names[id(p)]}::{key}"] = t.detach().contiguous().cpu()
    return tensors, groups


def save(out: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Write the state after ``step`` optimizer steps and make it the current checkpoint."""
    root = out / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    opt_tensors, groups = _optimizer_tensors(optimizer, names)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_file(_untie(model.state_dict()), str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": groups, **meta}) + "\n")
        shutil.rmtree(root / name, ignore_errors=True)  # a stale folder of the same step from a crashed run
        os.replace(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, json.dumps({"step": step, "dir": name}) + "\n")  # the commit point
    for old in root.iterdir():
        if old.name != name and old.name != LATEST:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def _current(out: Path) -> tuple[Path, dict]:
    root = out / STATE_DIR
    try:
        folder = root / json.loads((root / LATEST).read_text())["dir"]
        return folder, json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"resume: {out} holds no complete checkpoint to resume from") from None


def read_meta(out: Path) -> dict:
    """The current checkpoint's state.json (step, settings, data fingerprint, metrics, losses)."""
    return _current(out)[1]


def load(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the current checkpoint into ``model`` and ``optimizer`` (and the RNG); return its state.json."""
    folder, meta = _current(out)
    device = next(model.parameters()).device
    sd = load_file(str(folder / "model.safetensors"), device=str(device))
    own = model.state_dict()
    if "lm_head.weight" in own and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    if sd.keys() != own.keys() or any(sd[k].shape != own[k].shape for k in own):
        raise ValueError(f"resume: the checkpoint in {out} is for a different model shape")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    state: dict[int, dict] = {}
    groups = []
    index = 0
    for group, saved in zip(optimizer.param_groups, meta["param_groups"], strict=True):
        if saved["params"] != [names[id(p)] for p in group["params"]]:
            raise ValueError(f"resume: the checkpoint in {out} has different optimizer groups")
        groups.append({k: v for k, v in saved.items() if k != "params"} | {"params": list(range(
            index, index + len(group["params"])))})
        for n in saved["params"]:
            entry = {key.split("::", 1)[1]: t for key, t in tensors.items() if key.split("::", 1)[0] == n}
            if "step" in entry:  # AdamW keeps its step count as a CPU float tensor
                entry["step"] = entry["step"].cpu()
            if entry:
                state[index] = entry
            index += 1
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return meta
