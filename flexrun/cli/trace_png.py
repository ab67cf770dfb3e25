"""Render a `--trace` timeline (Chrome trace JSON, optionally gzipped) to a PNG.

One row per track (compute stream, weight stream, store stream, CPU attention, I/O threads),
one bar per event, coloured by kind, so anyone can see whether I/O and compute overlap.
Needs matplotlib (`pip install 'flexrun[plot]'`)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from flexrun.config import FlexrunError

COLOURS = {"h2d": "tab:blue", "load": "tab:cyan", "store": "tab:orange", "attn": "tab:red",
           "s": "tab:green"}


def load_events(path: str | Path) -> tuple[dict[int, str], list[dict]]:
    """(track names by tid, complete 'X' events) of a Chrome trace file."""
    p = Path(path)
    try:
        raw = gzip.open(p, "rt").read() if p.suffix == ".gz" else p.read_text()
        data = json.loads(raw)
    except FileNotFoundError:
        raise FlexrunError(f"trace file {p} not found: write one with "
                           "`flexrun generate ... --trace trace.json`") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise FlexrunError(f"{p} is not a Chrome trace JSON ({e})") from None
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["tid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    if not spans:
        raise FlexrunError(f"{p} holds no timed events (was the run traced?)")
    return names, spans


def _kind(name: str) -> str:
    head = name.split(" ")[0]
    return head if head in COLOURS else ("s" if head[:1] == "s" else "")


def _step_of(e: dict) -> int | None:
    head = e["name"].split(" ")[0]
    return int(head[1:]) if head[:1] == "s" and head[1:].isdigit() else None


def step_window(spans: list[dict], step: int) -> list[dict]:
    """The spans overlapping generation step `step` (0 is the prefill) of the last block the
    trace holds (a warm-up run comes first): from its first compute span ("s<step> u.. b..")
    to its last, so one decode step fills the picture."""
    runs: list[list[dict]] = []         # one per block run (a warm-up, each block): the
    last = None                          # step number falls back to 0 where one begins
    for e in sorted((e for e in spans if _step_of(e) is not None), key=lambda e: e["ts"]):
        if last is None or _step_of(e) < last:
            runs.append([])
        runs[-1].append(e)
        last = _step_of(e)
    mine = next(([e for e in run if _step_of(e) == step] for run in reversed(runs)
                 if any(_step_of(e) == step for e in run)), [])
    if not mine:
        have = sorted({_step_of(e) for e in spans} - {None})
        raise FlexrunError(f"the trace has no step {step}: it holds steps "
                           f"{have[0] if have else '-'}..{have[-1] if have else '-'}; "
                           "pass one of those to --step")
    lo = min(e["ts"] for e in mine)
    hi = max(e["ts"] + e["dur"] for e in mine)
    return [e for e in spans if e["ts"] < hi and e["ts"] + e["dur"] > lo]


def render(trace: str | Path, output: str | Path, width: float = 16.0,
           step: int | None = None) -> Path:
    """Draw the timeline of `trace` (only generation step `step` when given) into the PNG
    `output`; returns its path."""
    names, spans = load_events(trace)
    if step is not None:
        spans = step_window(spans, step)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlexrunError("trace-png needs matplotlib: pip install 'flexrun[plot]'") from None
    tids = sorted({e["tid"] for e in spans})
    t0 = min(e["ts"] for e in spans)
    fig, ax = plt.subplots(figsize=(width, 0.6 * len(tids) + 1.2))
    for row, tid in enumerate(tids):
        mine = [e for e in spans if e["tid"] == tid]
        bars = [((e["ts"] - t0) / 1e3, max(e["dur"] / 1e3, 1e-3)) for e in mine]
        colours = [COLOURS.get(_kind(e["name"]), "tab:gray") for e in mine]
        ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colours)
    ax.set_yticks(range(len(tids)), [names.get(t, str(t)) for t in tids])
    ax.set_xlabel("ms since the first event")
    what = "" if step is None else f", step {step}"
    ax.set_title(f"{Path(trace).name}{what}: {len(spans)} events")
    fig.tight_layout()
    out = Path(output)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
