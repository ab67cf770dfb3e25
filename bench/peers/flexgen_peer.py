"""Run FlexGen 0.1.8 offline on dummy weights and print one JSON line of its figures.

python -m bench.peers.flexgen_peer --model opt-30b --percent 20 80 0 100 0 100 \
    --gpu-batch-size 32 --num-gpu-batches 2 --prompt-len 512 --gen-len 32 [--cpu-cache-compute]
Needs the flexgen==0.1.8 wheel (and transformers). Its tokenizer is stubbed: the benchmark
only needs ids, and no model hub is reachable.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path


class _StubTokenizer:
    """Stands in for OPT's tokenizer: fixed ids, left padded to max_length."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, prompts, padding=None, max_length=None, **kw):
        body = [2, 40949, 16, 5, 812, 343, 9][:max_length]
        return self._Out([[1] * (max_length - len(body)) + body for _ in prompts])

    def batch_decode(self, ids, **kw):
        return ["" for _ in ids]


def main() -> None:
    import transformers
    transformers.AutoTokenizer.from_pretrained = lambda *a, **k: _StubTokenizer()
    from flexgen import flex_opt
    flex_opt.AutoTokenizer.from_pretrained = lambda *a, **k: _StubTokenizer()
    ap = argparse.ArgumentParser()
    flex_opt.add_parser_arguments(ap)
    argv = sys.argv[1:]
    model = argv[argv.index("--model") + 1]
    if not model.startswith("facebook/"):
        argv[argv.index("--model") + 1] = "facebook/" + model
    log = Path(tempfile.mkdtemp()) / "flexgen.log"
    offload = tempfile.mkdtemp(prefix="flexgen-offload-")
    args = ap.parse_args(argv + ["--path", "_DUMMY_", "--log-file", str(log),
                                 "--offload-dir", offload])
    flex_opt.run_flexgen(args)
    text = log.read_text()

    def num(key):
        return float(re.search(key + r": ([0-9.]+)", text).group(1))
    print("FLEXGEN_RESULT " + json.dumps({
        "peak_gpu_GB": num("peak gpu mem"), "prefill_s": num("prefill latency"),
        "decode_s": num("decode latency"), "total_s": num("total latency"),
        "total_tok_s": num("total throughput"), "decode_tok_s": num("decode throughput"),
        "prefill_tok_s": num("prefill throughput"), "args": vars(args)}, default=str))


if __name__ == "__main__":
    main()
