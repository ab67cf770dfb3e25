"""Run HF Accelerate offloading on a flexrun dummy shape and print one JSON line of its figures.

python -m bench.peers.accelerate_peer --model mixtral-8x7b --prompt-len 512 --gen-len 32 \
    --batch-size 4 --gpu-mem 24GiB --cpu-mem 100GiB --device cuda [--cut-gen-len 3]
Accelerate's big-model route on a transformers model of the dummy preset's shape (OPT, Llama,
Mistral, Qwen2/3, Mixtral, Qwen2-MoE, Qwen3-MoE; bench/peers/hf_shapes.py): an empty model
(`init_empty_weights`), a device map from `infer_auto_device_map(max_memory=...)`, flexrun's
own synthetic values (same names, same values: both systems run the same weights) put where
the map says, disk ones in an offload folder, then `dispatch_model(..., offload_dir=...)`: what
does not fit the GPU / CPU budget goes to disk. Needs transformers and accelerate (bench
extras, never runtime dependencies).

Budgets. flexrun's --gpu-mem covers weights, KV cache and activations; Accelerate's max_memory
covers weights only. So on CUDA the process is capped at --gpu-mem
(`torch.cuda.set_per_process_memory_fraction(gpu_mem / total)`: a KV cache or activations
beyond it fail as out of memory) and max_memory's GPU entry is --gpu-mem less a reserve: the
KV cache of one batch at prompt + gen length, the prefill's activations (hidden states, the
widest MLP over every prompt token, fp32 attention scores, the last position's logits) and
0.5 GiB of slack (--gpu-weights-mem sets it instead). Accelerate itself keeps room for its
largest layer on the GPU when it offloads (it streams offloaded layers through it).

Decode experts. On a GPU, transformers' generate() switches a grouped_mm model's experts to
`batched_mm` for decode, which gathers each (token, expert) pair's own copy of the expert's
weights: 352 MB per pair for Mixtral, 2.8 GB at batch 4, beyond a 24 GiB cap beside the
weights. Where that gather exceeds the reserve's room for the prefill's activations and slack
(free again at decode), the switch is skipped and decode runs the prefill's forward
(`--decode-experts keep|switch|auto`; the result says which ran).

Routing. flexrun's dummy MoE presets draw experts from a stated distribution (uniform by
default, FLEXRUN_DUMMY_ROUTING); the HF model runs its own router over the synthetic router
weights. Fine for a peer: Accelerate streams every offloaded weight (all experts of a layer
are one tensor) on each forward whatever the routing.

--cut-gen-len N runs N decode steps per batch (N + 1 new tokens) and extrapolates the decode
time to the full --gen-len (as FlexGen's --cut-gen-len); the result says so
(`extrapolated`, `decode_steps_run`, `decode_s_measured`).
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from bench.peers.hf_shapes import device_kind, hf_config, materialize
from flexrun.config import parse_size
from flexrun.models.dummy import dummy_spec
from flexrun.models.spec import ModelSpec

SLACK = 1 << 29       # 0.5 GiB of the GPU reserve beside the KV cache and activations


def gpu_reserve(spec: ModelSpec, batch: int, prompt_len: int, gen_len: int, elem: int) -> int:
    """GPU bytes Accelerate needs beside its weights for one batch (see the module doc)."""
    kv = spec.kv_bytes_per_token(elem) * batch * (prompt_len + gen_len)
    return kv + prefill_act_bytes(spec, batch, prompt_len, elem) + SLACK


def prefill_act_bytes(spec: ModelSpec, batch: int, prompt_len: int, elem: int) -> int:
    """The prefill's activations: hidden states, the widest MLP over every prompt token, fp32
    attention scores, the last position's logits."""
    tokens = batch * prompt_len
    ffn = max(spec.ffn_dim, spec.expert_ffn_dim, spec.shared_expert_ffn_dim)
    return (tokens * (8 * spec.hidden_size + 3 * ffn) * elem
            + batch * spec.num_heads * prompt_len * prompt_len * 4
            + 2 * batch * spec.vocab_size * 4)


def decode_gather_bytes(spec: ModelSpec, batch: int, elem: int) -> int:
    """GPU bytes of transformers' decode-time experts route (`batched_mm`, which generate()
    switches to from grouped_mm on a GPU): it gathers every (token, expert) pair's own copy
    of the expert's gate/up and down weights."""
    return batch * spec.experts_per_token * 3 * spec.hidden_size * spec.expert_ffn_dim * elem


def decode_experts(choice: str, spec: ModelSpec, batch: int, prompt_len: int, elem: int) -> str:
    """"switch" (generate() moves decode to batched_mm) or "keep" (decode runs the prefill's
    experts forward); auto switches where the gather fits the reserve's room for the
    prefill's activations and slack (free again at decode)."""
    if choice != "auto":
        return choice
    room = prefill_act_bytes(spec, batch, prompt_len, elem) + SLACK
    return "switch" if decode_gather_bytes(spec, batch, elem) <= room else "keep"


def placement_summary(device_map: dict, num_layers: int) -> dict:
    """Decoder layers per device (gpu / cpu / disk), and where the other modules went."""
    layers: Counter = Counter()
    other = {}
    for mod, d in device_map.items():
        m = re.search(r"(?:^|\.)layers(?:\.(\d+))?(?:\.|$)", mod)
        if mod == "":
            layers[device_kind(d)] += num_layers       # the whole model on one device
        elif m is None:
            other[mod] = device_kind(d)
        elif m.group(1) is None:
            layers[device_kind(d)] += num_layers       # the whole ModuleList on one device
        elif mod.endswith(f"layers.{m.group(1)}"):
            layers[device_kind(d)] += 1
    return {"layers": dict(layers), "other": other}


class _TokenTimes:
    """A generate() streamer that notes when each new token arrives (the first: end of
    prefill; each later one: end of a decode step)."""

    def __init__(self) -> None:
        self.calls, self.times = 0, []

    def put(self, value) -> None:
        self.calls += 1
        if self.calls >= 2:                     # the first call hands over the prompt
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def versions() -> dict:
    import accelerate
    import transformers
    return {"transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "torch": torch.__version__}


def experts_implementation(requested: str | None, device: str, dtype: torch.dtype) -> str:
    """transformers' experts forward: the one asked for, else its default (grouped_mm) when a
    tiny grouped GEMM of this dtype runs on this device, else eager (one GEMM per expert)."""
    if requested:
        return requested
    try:
        from transformers.integrations.moe import _grouped_mm
        x = torch.ones(16, 64, dtype=dtype, device=device)
        w = torch.ones(2, 64, 64, dtype=dtype, device=device)
        _grouped_mm(x, w, torch.tensor([8, 16], dtype=torch.int32, device=device))
        return "grouped_mm"
    except Exception:       # an older kernel without this dtype, or a moved private name
        return "eager"


def build(a: argparse.Namespace, spec: ModelSpec, dtype: torch.dtype, work: Path):
    """The dispatched model, its device map, max_memory and the weight bytes per device."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from transformers import AutoModelForCausalLM
    cuda = a.device == "cuda"
    kw = {}
    if spec.num_experts:
        kw["experts_implementation"] = experts_implementation(a.experts_impl, a.device, dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=dtype, **kw)
    model.tie_weights()
    max_memory: dict = {"cpu": parse_size(a.cpu_mem)}
    if cuda:
        gpu = parse_size(a.gpu_mem)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu / total), 0)
        elem = torch.finfo(dtype).bits // 8
        weights = (parse_size(a.gpu_weights_mem) if a.gpu_weights_mem else
                   gpu - gpu_reserve(spec, a.batch_size, a.prompt_len, a.gen_len, elem))
        if weights <= 0:
            raise SystemExit(f"--gpu-mem {a.gpu_mem} leaves no room for weights")
        max_memory[0] = weights
    device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=dtype,
                                       no_split_module_classes=list(model._no_split_modules))
    placed = materialize(model, spec, device_map, work, dtype)
    model = dispatch_model(model, device_map=device_map, offload_dir=str(work))
    model.eval()
    model.generation_config.eos_token_id = None     # exactly max_new_tokens, eos not masked
    if cuda and spec.num_experts and \
            getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        a.decode_experts = "n/a"            # generate() switches grouped_mm models only
    elif cuda and spec.num_experts:
        a.decode_experts = decode_experts(a.decode_experts, spec, a.batch_size, a.prompt_len,
                                          torch.finfo(dtype).bits // 8)
        if a.decode_experts == "keep":
            from contextlib import nullcontext
            model._optimize_model_for_decode = nullcontext
    return model, device_map, max_memory, placed


def run(a: argparse.Namespace) -> dict:
    """Build, dispatch, warm up and time Accelerate; the result dict."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.num_prompts = a.num_prompts or a.batch_size
    cuda = a.device == "cuda"
    dtype = getattr(torch, a.dtype) if a.dtype else torch.float16 if cuda else torch.float32
    spec = dummy_spec(a.model.removeprefix("dummy:"))
    steps = a.gen_len - 1 if a.cut_gen_len is None else max(1, min(a.cut_gen_len, a.gen_len - 1))
    work = Path(tempfile.mkdtemp(prefix="accel-peer-", dir=a.offload_dir))
    try:
        t0 = time.perf_counter()
        model, device_map, max_memory, placed = build(a, spec, dtype, work)
        load_s = time.perf_counter() - t0
        main = torch.device("cuda:0" if cuda else "cpu")
        g = torch.Generator().manual_seed(0)   # the same prompts as bench.run_flexrun
        ids = torch.randint(10, min(spec.vocab_size, 30000), (a.num_prompts, a.prompt_len),
                            generator=g)
        pad = spec.pad_token_id if spec.pad_token_id is not None else (spec.eos_token_ids or [0])[0]

        def gen(x: torch.Tensor, n: int, streamer=None) -> torch.Tensor:
            x = x.to(main)
            return model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                  num_beams=1, max_new_tokens=n, pad_token_id=pad,
                                  streamer=streamer)
        with torch.inference_mode():
            gen(ids[:1, :min(a.prompt_len, 32)], 2)               # warm-up: every hook, once
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            prefill = decode = 0.0
            first = None
            for i in range(0, a.num_prompts, a.batch_size):
                st = _TokenTimes()
                ts = time.perf_counter()
                out = gen(ids[i:i + a.batch_size], steps + 1, st)
                if cuda:
                    torch.cuda.synchronize()
                te = time.perf_counter()
                tf = st.times[0] if st.times else te
                prefill += tf - ts
                decode += te - tf
                if first is None:
                    first = out[0, a.prompt_len:].tolist()
        n = a.num_prompts
        decode_full = decode * (a.gen_len - 1) / steps
        total = prefill + decode_full
        return {
            "model": f"dummy:{spec.name.split(':')[-1]}", "family": spec.family or spec.arch,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "versions": versions(),
            "placement": placement_summary(device_map, spec.num_layers),
            "device_map_bytes": placed, "weights_GB": {k: v / 1e9 for k, v in placed.items()},
            "max_memory": {str(k): v for k, v in max_memory.items()},
            "load_s": load_s, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
            "num_prompts": n, "batch_size": a.batch_size,
            "decode_steps_run": steps, "extrapolated": steps < a.gen_len - 1,
            "decode_s_measured": decode, "decode_step_s": decode / (steps * -(-n // a.batch_size)),
            "prefill_s": prefill, "decode_s": decode_full, "total_s": total,
            "prefill_tok_s": n * a.prompt_len / prefill,
            "decode_tok_s": n * (a.gen_len - 1) / max(decode_full, 1e-9),
            "total_tok_s": n * a.gen_len / total,
            "routing": "router" if spec.num_experts else None,
            "experts_implementation": getattr(model.config, "_experts_implementation", None)
            if spec.num_experts else None,
            "decode_experts": a.decode_experts if spec.num_experts and cuda else None,
            "peak_gpu_GB": torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
            "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "first_tokens": first[:8], "args": vars(a)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True,
                    help="a flexrun dummy preset, e.g. opt-1.3b, mixtral-8x7b, qwen3-30b-a3b")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--cut-gen-len", type=int, default=None,
                    help="run this many decode steps and extrapolate to --gen-len")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-prompts", type=int, default=None, help="default: one batch")
    ap.add_argument("--gpu-mem", default="16GiB", help="the process's CUDA cap")
    ap.add_argument("--gpu-weights-mem", default=None,
                    help="max_memory for weights on the GPU (default: --gpu-mem less a reserve)")
    ap.add_argument("--cpu-mem", default="1GiB")
    ap.add_argument("--offload-dir", default=None, help="parent of the temporary folder")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--experts-impl", choices=["eager", "grouped_mm", "batched_mm"],
                    default=None, help="transformers' MoE experts forward (default: grouped_mm "
                    "where it runs, else eager)")
    ap.add_argument("--decode-experts", choices=["auto", "switch", "keep"], default="auto",
                    help="MoE on CUDA: 'switch' lets generate() move decode to batched_mm (each "
                    "token's experts gathered: decode_gather_bytes), 'keep' runs decode with the "
                    "prefill's experts forward; auto: keep where the gather exceeds the reserve")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: float16 on CUDA, float32 on the CPU (as flexrun)")
    return ap


def main() -> None:
    a = parser().parse_args()
    print("ACCELERATE_RESULT " + json.dumps(run(a), default=str), flush=True)


if __name__ == "__main__":
    main()
