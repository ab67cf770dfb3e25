"""A benchmarked system's process: its environment, its run under a time limit with its output
in a log, the kernel's out-of-memory kill lines when it was killed, and what nvidia-smi says of
the GPU (bench.run)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def child_env() -> dict:
    """The environment for a system's process: the user's, without the CUDA allocator default
    that importing flexrun sets (it must not reach the peers)."""
    import flexrun
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if flexrun.ALLOC_CONF_SET_BY_FLEXRUN:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    return env


def run_system(cmd: list[str], tag: str, log: Path, timeout: int, cwd: Path) -> dict:
    """Run one system's process with its output streamed into `log` (kept when it times out:
    the process group is killed, helpers holding its pipes included); its result line."""
    t0, up0 = time.time(), uptime()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, text=True,
                             env=child_env(), start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return {"error": f"timed out after {timeout} s", "wall_s": time.time() - t0,
                    "log_tail": log.read_text(errors="replace").splitlines()[-5:]}
        except BaseException:       # this process stopped (Ctrl-C, SIGTERM): the group it made
            try:                                 # would outlive it and hold the GPU and RAM
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise
    out = log.read_text(errors="replace").splitlines()
    for line in out:
        if line.startswith(tag + " "):
            r = json.loads(line[len(tag) + 1:])
            r["wall_s"] = time.time() - t0
            return r
    err = {"error": (out or ["no output"])[-1], "rc": p.returncode}
    if p.returncode == -signal.SIGKILL:     # killed from outside: the kernel's OOM killer?
        err.update(oom_kills(up0))
    return err


def uptime() -> float:
    """Seconds since boot (the kernel log's clock); 0 where /proc/uptime is missing."""
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def oom_kills(since: float, log: str | None = None) -> dict:
    """The kernel log's out-of-memory kill lines stamped after `since` (uptime seconds: the
    killed process's memory at its death), as {"error": ..., "oom_kill": [...]}; {} where there
    are none or the log cannot be read. log: the kernel log's text (default: dmesg's)."""
    if log is None:
        try:
            log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
    lines = []
    for ln in log.splitlines():
        stamp = ln.partition("]")[0].lstrip("[ ")
        try:
            after = float(stamp) >= since
        except ValueError:
            after = True                        # a log without stamps: every kill line
        if "Killed process" in ln and after:
            lines.append(ln.strip())
    return {"error": "killed by the kernel's out-of-memory killer (host memory)",
            "oom_kill": lines} if lines else {}


def _smi(*query: str) -> list[str]:
    """nvidia-smi's CSV lines for the first GPU this process sees (CUDA_VISIBLE_DEVICES'
    first entry; this process keeps no CUDA context); [] where it is missing or fails."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    try:
        p = subprocess.run(["nvidia-smi", "-i", first, *query, "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in p.stdout.splitlines() if ln.strip()] if p.returncode == 0 else []


def gpu_name() -> str:
    """The GPU's name, else "cpu"."""
    return (_smi("--query-gpu=name") or ["cpu"])[0]


def gpu_processes() -> list[str]:
    """Compute processes on the GPU now ("pid name MiB")."""
    return [" ".join(x.strip() for x in ln.split(","))
            for ln in _smi("--query-compute-apps=pid,process_name,used_memory")]
