"""Batch jobs under SIGKILL, SIGINT / SIGTERM and real mounts (read-only offload dir, full
disk), run as subprocesses: the finished output lines stay, a rerun completes, and no offload
files are left behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import lru_cache

import pytest

from conftest import write_jsonl
from flexrun.cli import main
from job_files import DISK, REPO, Job, one_error_line


@pytest.fixture
def job(tmp_path, opt_dir) -> Job:
    return Job(tmp_path, opt_dir)


# ---- subprocesses: SIGKILL, SIGINT / SIGTERM ---------------------------------------------------
def spawn(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "flexrun.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_lines(job: Job, n: int, proc: subprocess.Popen, timeout: float = 60) -> int:
    """Wait until the output holds >= n complete lines; returns how many it holds."""
    end = time.time() + timeout
    while time.time() < end:
        have = job.out.read_bytes().count(b"\n") if job.out.exists() else 0
        if have >= n:
            return have
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.01)
    raise AssertionError(f"no {n} output lines after {timeout}s")


@pytest.fixture
def long_job(tmp_path, opt_dir) -> Job:
    return Job(tmp_path, opt_dir, n=40)


def test_sigkill_anywhere_then_rerun_completes(long_job, capsys):
    job = long_job
    for _ in range(2):                      # kill a fresh run, then a resumed one
        have = len(job.ids())
        proc = spawn(job.args(new=32))
        wait_lines(job, have + 2, proc)
        proc.kill()
        proc.wait()
    # the resumed run removed the first run's files; the second run's are left for the next
    assert [n.split("-")[2] for n in job.offload_files()] == [str(proc.pid)]
    assert main(job.args(new=32)) == 0
    assert job.ids() == ["old"] + [f"p{i}" for i in range(40)]     # all, in input order
    assert job.offload_files() == []


@pytest.mark.parametrize("sig,times", [(signal.SIGINT, 1), (signal.SIGTERM, 1),
                                       (signal.SIGINT, 2)], ids=["int", "term", "int-twice"])
def test_signal_stops_cleanly_and_rerun_resumes(long_job, capsys, sig, times):
    """One signal: the current block (4 prompts) finishes, then the job stops. A second
    signal stops at once: sent inside a single 40-prompt block, nothing of it is written."""
    job = long_job
    block = 4 if times == 1 else 40
    proc = spawn(job.args("--num-gpu-batches", str(block), new=32))
    if times == 1:
        seen = wait_lines(job, 1 + block, proc)
    else:                                   # wait until the block's KV cache files exist
        end = time.time() + 60
        while not any("kv-" in f.name for f in job.off.glob("flexrun-run-*/*")):
            assert proc.poll() is None and time.time() < end, proc.communicate()[1]
            time.sleep(0.01)
        seen = 1
    for _ in range(times):
        proc.send_signal(sig)
        time.sleep(0.1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    done = len(job.ids())
    assert lines[0] == (f"flexrun: stopped by {sig.name} after {done} of 41 ids; "
                        "rerun the same command to resume")
    if times == 1:                          # whole blocks only, and it did not run to the end
        assert (done - 1) % block == 0 and seen <= done <= seen + 2 * block and done < 41
    else:
        assert done == 1
    assert job.offload_files() == []
    assert main(job.args(new=32)) == 0
    assert job.ids() == ["old"] + [f"p{i}" for i in range(40)]


def test_signal_while_loading_stops_at_once(tmp_path, capsys):
    """Loading can take minutes: a signal then stops at once and removes the offload files."""
    job = Job(tmp_path, "dummy:opt-125m", policy={**DISK, "weights_disk": 0, "weights_cpu": 100})
    write_jsonl(job.inp, [{"id": "old", "input_ids": [5]}, {"id": 1, "input_ids": [5, 6]}])
    proc = spawn(job.args())
    end = time.time() + 60
    while not any(job.off.glob("flexrun-run-*")):          # the model is being placed now
        assert proc.poll() is None and time.time() < end, proc.communicate()[1]
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip() == ("flexrun: stopped by SIGTERM after 1 of 2 ids; rerun the same "
                           "command to resume")
    assert job.ids() == ["old"] and job.offload_files() == []


# ---- real mounts in a user+mount namespace: read-only offload dir, full disk -----------------
@lru_cache(maxsize=1)
def can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                       capture_output=True)
    return r.returncode == 0


needs_mount = pytest.mark.skipif("not can_mount()",
                                 reason="needs `unshare -rm` (user + mount namespaces)")


def in_namespace(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def cli_line(job: Job, *extra: str, new: int = 4) -> str:
    return " ".join([sys.executable, "-m", "flexrun.cli", *job.args(*extra, new=new)])


def test_offload_dir_not_writable(job, capsys):
    before = job.out.read_bytes()
    if os.geteuid() != 0:
        job.off.chmod(0o555)
        rc, err = main(job.args()), capsys.readouterr().err
        job.off.chmod(0o755)
    elif can_mount():       # root ignores permissions: make it a read-only mount instead
        r = in_namespace(f"mount --bind {job.off} {job.off} && "
                         f"mount -o remount,ro,bind {job.off} && {cli_line(job)}")
        rc, err = r.returncode, r.stderr
    else:
        pytest.skip("running as root without `unshare -rm`: cannot make a directory read-only")
    one_error_line(rc, err, "not writable", "--offload-dir")
    assert job.out.read_bytes() == before
    assert job.offload_files() == []


FILLER = """import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
while True:                     # take every page the job frees until the job is gone
    try:
        os.write(fd, bytes(4096))
    except OSError:
        pass
    try:
        os.kill(int(sys.argv[2]), 0)
    except ProcessLookupError:
        break
"""


@needs_mount
@pytest.mark.parametrize("what", ["activations", "kv-cache"])
def test_disk_fills_up_during_run(long_job, capsys, what):
    """A small tmpfs as --offload-dir: filled by another writer after some blocks (activation
    writes fail), or too small for the KV cache of the first block (cache writes fail)."""
    job = long_job
    if what == "activations":
        job.policy.write_text(json.dumps({**DISK, "act_gpu": 0, "act_disk": 100}))
        (job.root / "fill.py").write_text(FILLER)
        fill = (f"while [ $(wc -l < {job.out}) -lt 4 ]; do sleep 0.01; done; "
                f"{sys.executable} {job.root / 'fill.py'} {job.off}/filler $P & ")
        size = "4m"
    else:
        job.policy.write_text(json.dumps({**DISK, "weights_disk": 0, "weights_cpu": 100,
                                          "gpu_batch_size": 8}))
        fill, size = "", "64k"
    before = job.out.read_bytes()
    r = in_namespace(f"mount -t tmpfs -o size={size} tmpfs {job.off} && "
                     f"{{ {cli_line(job, new=32)} & P=$!; {fill}wait $P; echo rc=$?; wait; "
                     f"ls -A {job.off}; }}")
    out = r.stdout.split()
    assert out[0] == "rc=2", r.stderr
    one_error_line(2, r.stderr, "disk full while writing offload files", "--offload-dir")
    assert out[1:] == (["filler"] if fill else [])          # the run's files are gone
    assert job.out.read_bytes().startswith(before)           # finished lines kept
    kept = len(job.ids())
    assert kept >= (4 if fill else 1)
    assert main(job.args(new=32)) == 0                       # rerun on a roomy disk finishes
    assert sorted(job.ids(), key=str) == ["old"] + sorted(f"p{i}" for i in range(40))
    assert job.offload_files() == []
