"""What the batch-job tests share: a job's paths (input, output with one finished line, offload
dir, disk policy) and the one-line error check."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]
PRIOR = {"id": "old", "output_ids": [5, 6], "text": "x", "finish_reason": "length"}
DISK = {"gpu_batch_size": 1, "weights_gpu": 0, "weights_cpu": 0, "weights_disk": 100,
        "cache_gpu": 0, "cache_cpu": 0, "cache_disk": 100}
PROMPTS = ["the quick brown fox", "hello world, this is flexrun", "offloading weights to disk",
           "a b c d e f g 0 1 2 3"]


class Job:
    """Paths of one job: input, output (holding one finished line), offload dir, disk policy."""

    def __init__(self, root: Path, model: Path, n: int = 4, policy: dict | None = None):
        self.root, self.model = root, model
        self.inp, self.out, self.off = root / "in.jsonl", root / "out.jsonl", root / "off"
        self.off.mkdir()
        self.policy = root / "policy.json"
        self.policy.write_text(json.dumps(policy or DISK))
        rows = [{"id": "old", "prompt": "hello"}]
        rows += [{"id": f"p{i}", "prompt": PROMPTS[i % 4] * (1 + i % 3)} for i in range(n)]
        write_jsonl(self.inp, rows)
        write_jsonl(self.out, [PRIOR])

    def args(self, *extra: str, new: int = 4) -> list[str]:
        return ["generate", "--model", str(self.model), "--input", str(self.inp), "--output",
                str(self.out), "--policy", str(self.policy), "--offload-dir", str(self.off),
                "--device", "cpu", "--quiet", "--max-new-tokens", str(new), "--ignore-eos",
                *extra]

    def ids(self) -> list:
        data = self.out.read_bytes()
        assert data.endswith(b"\n"), "output ends with a partial line"
        return [json.loads(line)["id"] for line in data.splitlines()]

    def offload_files(self) -> list[str]:
        return sorted(p.name for p in self.off.iterdir()) if self.off.is_dir() else []


def one_error_line(rc: int, err: str, *words: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("flexrun: error: "), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]
