"""The FlexGen paper's headline table, re-made: OPT-6.7B / 30B / 175B on one GPU given 16 GiB.

python -m bench.run H-opt-30b --only deepspeed --merge     # a system or two per 10-minute call
python -m bench.headline [--results bench/results] [--device NVIDIA-H200]   # prints the table

Generation throughput (tokens/s, prompt 512, gen 32) of each system at its best batch and
placement under a 16 GiB GPU budget and 100 GiB of CPU memory, beside the paper's numbers (one
T4 16 GB, 208 GB RAM, 1.5 TB SSD; FlexGen paper Table 2). The scenarios H-opt-6.7b,
H-opt-30b and H-opt-175b live here and are run by bench.run (each system its own process; with
--merge the result file keeps the systems run in earlier calls). FlexGen's rows use the
paper's own policies where this machine holds them (bench_suite.py: 6.7B all on GPU, batch 2;
compressed batch 72) and S1 / S2-16GiB's for OPT-30B. A system that cannot hold a model gets
"does not fit" with the arithmetic; Petals is not run (it needs a swarm of servers).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.table import extrapolated

GB = 1e9
HOST_RAM = 125 * 2**30          # the H200 machine (DESIGN.md section 5)
HOST_DISK = 64 * 2**30
MODELS = ("opt-6.7b", "opt-30b", "opt-175b")
# the paper's T4 tok/s for OPT-6.7B, 30B, 175B (FlexGen (c): 4-bit weights and KV cache)
PAPER_T4 = {"accelerate": (25.12, 0.62, 0.01), "deepspeed": (9.28, 0.60, 0.01),
            "petals": (8.25, 2.84, 0.08), "flexgen": (25.26, 7.32, 0.69),
            "flexgen-compressed": (29.12, 8.38, 1.12)}
# table row: (label, paper key, systems of the H-* scenarios standing for it: best one counts)
ROWS = [("HF Accelerate", "accelerate", ("accelerate", "accelerate-b2", "accelerate-b8")),
        ("DeepSpeed ZeRO-Inference", "deepspeed", ("deepspeed",)),
        ("DeepSpeed ZeRO-Inference (c)", None, ("deepspeed-compressed",)),
        ("Petals", "petals", ()),
        ("FlexGen", "flexgen", ("flexgen",)),
        ("FlexGen (c)", "flexgen-compressed", ("flexgen-compressed",)),
        ("flexrun", None, ("flexrun-auto",)),
        ("flexrun (c)", None, ("flexrun-compressed",))]
PETALS = "not run: needs a swarm of servers"
# OPT-30B rows measured by S1 / S2-16GiB with the same arguments: used where H-opt-30b has none
FROM_SCENARIOS = {"opt-30b": {"flexrun-auto": ("S1", "flexrun-auto"), "flexgen": ("S1", "flexgen"),
                              "accelerate": ("S1", "accelerate"), "deepspeed": ("S1", "deepspeed"),
                              "deepspeed-compressed": ("S1", "deepspeed-compressed"),
                              "flexgen-compressed": ("S2-16GiB", "flexgen"),
                              "flexrun-compressed": ("S2-16GiB", "flexrun")}}

_B = ["--gpu-mem", "16GiB", "--cpu-mem", "100GiB"]
_ACC = ["--device", "cuda", *_B]
_FG_30B = ["--model", "opt-30b", "--percent", "20", "80", "0", "100", "0", "100",
           "--gpu-batch-size", "32", "--num-gpu-batches", "2", "--cpu-cache-compute"]
_FG_GPU = ["--percent", "100", "0", "100", "0", "100", "0", "--num-gpu-batches", "1",
           "--overlap", "False"]
_C = ["--compress-weight", "--compress-cache"]
HEADLINE_SCENARIOS = {
    "H-opt-6.7b": {
        "what": "FlexGen paper table: OPT-6.7B, 16 GiB GPU, 100 GiB CPU",
        "accelerate-b2": ["--model", "opt-6.7b", *_ACC, "--batch-size", "2"],
        "accelerate-b8": ["--model", "opt-6.7b", *_ACC, "--batch-size", "8"],
        "deepspeed": ["--model", "opt-6.7b", "--gpu-mem", "16GiB", "--batch-size", "auto"],
        "deepspeed-compressed": ["--model", "opt-6.7b", "--gpu-mem", "16GiB", "--batch-size",
                                 "auto", "--quant-bits", "4"],
        "flexgen": ["--model", "opt-6.7b", *_FG_GPU, "--gpu-batch-size", "2"],
        "flexgen-compressed": ["--model", "opt-6.7b", *_FG_GPU, "--gpu-batch-size", "72", *_C],
        "flexrun-auto": ["--model", "dummy:opt-6.7b", "--policy", "auto", *_B],
        "flexrun-compressed": ["--model", "dummy:opt-6.7b", "--policy", "auto", *_B, *_C],
        "floor": "pcie"},
    "H-opt-30b": {
        "what": "FlexGen paper table: OPT-30B, 16 GiB GPU, 100 GiB CPU (S1's rows; (c): "
                "4-bit weights as S2-16GiB)",
        "accelerate": ["--model", "opt-30b", *_ACC, "--batch-size", "8", "--cut-gen-len", "4"],
        "deepspeed": ["--model", "opt-30b", "--gpu-mem", "16GiB", "--batch-size", "auto",
                      "--cut-gen-len", "8"],
        "flexgen": _FG_30B,
        # (its first call ran past 195 s: 8 of the 32 steps, extrapolated as FlexGen does)
        "flexgen-compressed": _FG_30B + ["--compress-weight", "--cut-gen-len", "8"],
        "flexrun-auto": ["--model", "dummy:opt-30b", "--policy", "auto", *_B,
                         "--num-prompts", "64"],
        "flexrun-compressed": ["--model", "dummy:opt-30b", "--policy", "auto", *_B,
                               "--compress-weight", "--num-prompts", "64"],
        "floor": "pcie"},
    "H-opt-175b": {
        "what": "FlexGen paper table: OPT-175B, 16 GiB GPU, 100 GiB CPU; fits only with 4-bit "
                "weights (about 98 GB), so only the compressed rows run",
        "flexgen-compressed": ["--model", "opt-175b", "--percent", "0", "100", "0", "100", "0",
                               "100", "--gpu-batch-size", "12", "--num-gpu-batches", "2",
                               "--pin-weight", "0", "--cut-gen-len", "4", *_C],
        "flexrun-compressed": ["--model", "dummy:opt-175b", "--policy", "auto", *_B, *_C],
        # ZeRO-3 streams all ~98 GB of 4-bit weights each step: a few steps, extrapolated;
        # unpinned as DeepSpeed's OPT-175B script runs it (pinned, its parameters' pinned
        # buffers took 127.5 GB of the 128 GiB host and the OOM killer stopped it)
        "deepspeed-compressed": ["--model", "opt-175b", "--gpu-mem", "16GiB", "--batch-size",
                                 "auto", "--quant-bits", "4", "--cut-gen-len", "3",
                                 "--no-pin-memory"],
        "floor": "pcie"},
}


def weight_bytes(model: str, bits: int = 16, group: int = 64) -> int:
    """Bytes of an OPT preset's weights: fp16, or `bits` per value plus an fp16 min and scale
    per group of `group` values (FlexGen's and flexrun's 4-bit format)."""
    from flexrun.models.dummy import dummy_spec
    n = dummy_spec(model).num_params()
    return 2 * n if bits == 16 else int(n * (bits / 8 + 4 / group))


def does_not_fit(model: str, compressed: bool) -> str | None:
    """Why a system cannot hold `model` here (weights beyond RAM plus disk), else None."""
    need = weight_bytes(model, 4 if compressed else 16)
    room = HOST_RAM + HOST_DISK
    if need <= room:
        return None
    kind = "4-bit" if compressed else "fp16"
    return (f"does not fit: {need / GB:.0f} GB of {kind} weights > {HOST_RAM / GB:.0f} GB RAM "
            f"+ {HOST_DISK / GB:.0f} GB disk = {room / GB:.0f} GB")


def cell(res: dict | None, systems: tuple[str, ...], model: str, compressed: bool) -> str:
    """One table cell: the best run's tok/s, or why there is none."""
    if not systems:
        return PETALS
    why = does_not_fit(model, compressed)
    if why:
        return why
    runs = [(s, (res or {}).get(s)) for s in systems]
    done = [(s, r) for s, r in runs if isinstance(r, dict) and "total_tok_s" in r]
    if done:
        s, r = max(done, key=lambda sr: sr[1]["total_tok_s"])
        note = [f"batch {r['batch_size']}"] if r.get("batch_size") else []
        note += ["decode extrapolated"] if extrapolated(r) else []
        note += [f"from {r['from']}"] if r.get("from") else []
        note += [f"on {r['on']}"] if r.get("on") else []
        return f"{r['total_tok_s']:.2f}" + (f" ({', '.join(note)})" if note else "")
    errors = [f"{s}: {r['error']}" for s, r in runs if isinstance(r, dict) and "error" in r]
    return "failed: " + "; ".join(errors)[:200] if errors else "not run yet"


def table(results: Path, device: str) -> str:
    """The markdown table from bench/results/H-<model>-<device>.json. `device` may name several,
    comma-separated: a cell the first lacks is taken from the next that has it, marked "on X"."""
    devices = device.split(",")

    def load(name: str, dev: str) -> dict:
        p = results / f"{name}-{dev}.json"
        return json.loads(p.read_text()) if p.is_file() else {}
    res = {m: {} for m in MODELS}
    for i, dev in enumerate(devices):
        mark = {"on": dev} if i else {}
        for m in MODELS:
            found = {s: r for s, r in load(f"H-{m}", dev).items() if isinstance(r, dict)}
            for system, (scenario, key) in FROM_SCENARIOS.get(m, {}).items():
                r = load(scenario, dev).get(key)
                if system not in found and isinstance(r, dict):
                    found[system] = {**r, "from": scenario}
            for system, r in found.items():     # a run fills a gap or replaces a failure
                old = res[m].get(system)
                if old is None or ("total_tok_s" in r and "total_tok_s" not in old):
                    res[m][system] = {**r, **mark}
    head = "| system | " + " | ".join(f"{m.upper()} here | {m.upper()} paper (T4)"
                                       for m in MODELS) + " |"
    lines = [head, "|---" * (1 + 2 * len(MODELS)) + "|"]
    for label, paper, systems in ROWS:
        compressed = label.endswith("(c)")
        cells = []
        for i, m in enumerate(MODELS):
            cells.append(cell(res[m], systems, m, compressed))
            cells.append(f"{PAPER_T4[paper][i]:.2f}" if paper else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--device", default=None, help="as in the file names, e.g. NVIDIA-H200; "
                    "several, comma-separated, fill the first's gaps from the next "
                    "(default: the first device with an H-opt-30b result)")
    a = ap.parse_args()
    results = Path(a.results)
    device = a.device
    if device is None:
        found = sorted(results.glob("H-opt-30b-*.json")) or sorted(results.glob("H-opt-*.json"))
        device = found[0].stem.split("-", 3)[-1] if found else "unknown"
    print(f"tokens/s, prompt 512, gen 32, 16 GiB GPU, 100 GiB CPU; device {device}")
    print(table(results, device))


if __name__ == "__main__":
    main()
