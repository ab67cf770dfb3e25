"""One table of every scenario result: flexrun against each peer that ran in the same call.

python -m bench.table [--results bench/results] [--device NVIDIA-H200,cpu]

Reads bench/results/<scenario>-<device>.json (written by bench.run) and prints a markdown
table: scenario, device, prompt / gen lengths, flexrun's system and throughput, the peer's, and
flexrun over the peer (total and decode tok/s). Only peers from the same JSON are paired:
both ran on one machine, back to back. README's results table is this command's output.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

OURS = ("flexrun", "flexrun-auto", "flexrun-compressed")


def _ours(key: str) -> bool:
    """A flexrun system of a scenario (flexrun, flexrun-auto, flexrun-ahead2, ...)."""
    return key == "flexrun" or key.startswith("flexrun-")


def extrapolated(result: dict) -> bool:
    """Whether a peer's decode was timed over fewer steps than it reports (its own flag, or
    FlexGen's --cut-gen-len below the generation length)."""
    args = result.get("args") or {}
    cut, gen = args.get("cut_gen_len"), args.get("gen_len")
    return bool(result.get("extrapolated")) or (cut is not None and gen is not None and cut < gen)


def rows(results: Path, devices: list[str] | None = None) -> list[dict]:
    """A row per (scenario, device, flexrun system, peer) with both throughputs."""
    out = []
    for path in sorted(results.glob("*.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(res, dict) or "scenario" not in res:
            continue
        device = path.stem[len(res["scenario"]) + 1:]
        if "NVIDIA" in device and not device.startswith("NVIDIA"):
            continue                    # a variant's file (S1-fetch-ab-...): not a row
        if devices and device not in devices:
            continue
        ran = {k: v for k, v in res.items() if isinstance(v, dict) and "total_tok_s" in v}
        best = res.get("accelerate_best")
        if not any(_ours(k) for k in ran):      # the peer ran, flexrun not (yet, or failed)
            tried = next((res[k] for k in OURS if isinstance(res.get(k), dict)), None)
            ran = {**ran, "flexrun": {"missing": tried.get("error", "failed") if tried
                                      else "not run"}}
        for ours in (k for k in ran if _ours(k)):
            peers = [k for k in ran if not _ours(k) and not k.startswith("earlier")
                     and (best is None or not k.startswith("accelerate") or k == best)]
            for peer in peers or [None]:
                r, p = ran[ours], ran.get(peer) or {}
                out.append({"scenario": res["scenario"], "device": device,
                            "lens": f"{res.get('prompt_len')}/{res.get('gen_len')}",
                            "ours": ours, "ours_tok_s": r.get("total_tok_s"),
                            "ours_decode": r.get("decode_tok_s"), "missing": r.get("missing"),
                            "peer": peer,
                            "peer_tok_s": p.get("total_tok_s"),
                            "peer_decode": p.get("decode_tok_s"),
                            "extrapolated": extrapolated(p),
                            "peaks": [_peak(x, device) for x in (r, p)]})
    return out


def _peak(result: dict, device: str) -> float | None:
    """The run's peak memory in GB: GPU on a GPU run, resident set on a CPU one."""
    return result.get("peak_rss_GB" if device == "cpu" else "peak_gpu_GB")


def markdown(table: list[dict]) -> str:
    lines = ["| scenario | device | prompt/gen | flexrun tok/s (decode) | peer | peer tok/s "
             "(decode) | ratio total (decode) | peak GB flexrun / peer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        missing = r.get("missing")
        ours = missing or f"{r['ours_tok_s']:.2f} ({r['ours_decode']:.2f})"
        if r["peer"] is None:
            peer, theirs, ratio = "none (against the floor)", "-", "-"
        else:
            peer = r["peer"] + (" (decode extrapolated)" if r["extrapolated"] else "")
            theirs = f"{r['peer_tok_s']:.2f} ({r['peer_decode']:.2f})"
            ratio = "-" if missing else (f"{r['ours_tok_s'] / r['peer_tok_s']:.2f}x "
                                         f"({r['ours_decode'] / r['peer_decode']:.2f}x)")
        name = r["scenario"] + ("" if r["ours"] == "flexrun" else f" ({r['ours']})")
        peaks = " / ".join("-" if x is None else f"{x:.1f}" for x in r["peaks"][:1 + bool(
            r["peer"])])
        lines.append(f"| {name} | {r['device']} | {r['lens']} | {ours} | {peer} | {theirs} | "
                     f"{ratio} | {peaks} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--device", default=None, help="comma-separated device names as in the "
                    "file names (NVIDIA-H200, cpu); default: all")
    a = ap.parse_args()
    print(markdown(rows(Path(a.results), a.device.split(",") if a.device else None)))


if __name__ == "__main__":
    main()
