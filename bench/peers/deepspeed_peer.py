"""Run DeepSpeed ZeRO-Inference on a flexrun dummy OPT shape and print one JSON line of its figures.

python -m bench.peers.deepspeed_peer --model opt-30b --batch-size auto --gpu-mem 16GiB \
    --prompt-len 512 --gen-len 32 [--quant-bits 4] [--cut-gen-len 8] [--no-pin-memory]

ZeRO-Inference as DeepSpeed documents it (DeepSpeedExamples
inference/huggingface/zero_inference: README.md, run_model.py, utils.py; DeepSpeed 0.19):
transformers builds the model under `HfDeepSpeedConfig` with ZeRO stage 3, so `from_config`
runs inside `deepspeed.zero.Init` and every parameter is partitioned to its offload device as
its module is built; `deepspeed.initialize(model=..., config_params=...)` then wraps it, and each
forward gathers every layer's weights to the GPU (prefetching the next) and frees them after.
The config is run_model.py's: fp16, stage 3, `stage3_prefetch_bucket_size` and
`stage3_max_live_parameters` 2 h^2, `stage3_param_persistence_threshold` h, `offload_param`
{device: cpu, pin_memory} (ds_config() below). Its scripts use pinned memory on OPT-30B
(run_opt30b_a6000.sh); batch sizes there: 24 for OPT-30B on a 48 GB A6000 (16 for 66B, 8 for
175B with 4-bit weights); FlexGen's paper ran it on a 16 GB T4 at 16 (OPT-6.7B), 4 (OPT-30B).
Here `--batch-size auto` takes the largest batch whose KV cache and prefill activations fit
`--gpu-mem` beside ZeRO's live parameters (kv_batch()): ZeRO-3 keeps the whole KV cache on
the GPU, so the budget sets the batch.

4-bit weights ("deepspeed-compressed"): DeepSpeed >= 0.10.3 quantizes weights at model
construction when the config holds `weight_quantization.quantized_initialization`
({num_bits: 4, group_size: 64, group_dim: 1, symmetric: False}: utils.get_quant_config,
enabled by run_model.py's `--quant_bits 4`). zero.Init then quantizes each nn.Linear /
nn.Embedding weight before partitioning it (partition_parameters._post_init_method ->
inference/quantization/utils._quantize_param: asymmetric min-max groups along the input
dim, uint4 pairs with fp16 scale and min), wraps `_load_from_state_dict` so loaded
values are quantized, and wraps F.linear / F.embedding to dequantize on use
(DeQuantizer: DeepSpeed's JIT-built CUDA kernel for fp16 groups of a multiple of 8 along the
last dim, else torch ops; `--torch-dequant` forces the torch path if the kernel fails to build).
The other route, `post_init_quant` with `_init_group_wise_weight_quantization`, quantizes a
model already loaded in fp16; DeepSpeed's own benchmarks use quantized_initialization.

Weights: flexrun's synthetic values (same names and values as bench.run_flexrun and the
Accelerate peer), loaded into the partitioned model the way transformers loads a ZeRO-3
checkpoint (_load_state_dict_into_zero3_model): gather one module's parameters
(`zero.GatheredParameters(..., modifier_rank=0)`), `_load_from_state_dict`, re-partition.
transformers' random ZeRO-3 init pass is skipped, since every weight is written next.

Left out, as the result says: NVMe offload (`offload_param.device: nvme` needs DeepSpeed's
async_io op, built against libaio) and KV-cache offload (`set_kv_cache_offload` exists only in
DeepSpeed's transformers fork, tjruwase/transformers@kvcache-offload-cpu).

--cut-gen-len N runs N decode steps and extrapolates decode to --gen-len (the result says
`extrapolated`); ZeRO-3 streams every weight each step, so its steps take about equal time.
Needs deepspeed (pure-Python wheel, ops JIT-built), transformers, accelerate: never
dependencies of flexrun.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import time

import torch

from bench.peers.hf_shapes import hf_config, tied_names
from bench.peers.report import run_and_report
from flexrun.config import parse_size
from flexrun.models.dummy import dummy_spec, synthetic_tensor
from flexrun.models.loader import canonical_name
from flexrun.models.spec import ModelSpec

GiB = 1 << 30
LEFT_OUT = {
    "nvme_offload": "not run: DeepSpeed's NVMe offload needs its async_io op, built against "
                    "libaio, which the GPU image lacks",
    "kv_offload": "not run: ZeRO-Inference's KV-cache offload (model.set_kv_cache_offload) "
                  "exists only in DeepSpeed's transformers fork "
                  "(github.com/tjruwase/transformers@kvcache-offload-cpu)",
}


def ds_config(hidden_size: int, batch_size: int, *, pin_memory: bool = True,
              quant_bits: int = 16, group_size: int = 64, dtype: str = "float16") -> dict:
    """ZeRO-Inference's DeepSpeed config (DeepSpeedExamples zero_inference/run_model.py):
    ZeRO-3 with parameters offloaded to CPU; quant_bits 4 adds quantized_initialization."""
    if quant_bits not in (4, 8, 16):
        raise ValueError(f"quant_bits must be 4, 8 or 16, not {quant_bits}")
    h2 = 2 * hidden_size * hidden_size
    cfg = {
        "fp16": {"enabled": dtype == "float16"},
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_optimization": {
            "stage": 3,
            "stage3_prefetch_bucket_size": h2,
            "stage3_param_persistence_threshold": hidden_size,
            "stage3_max_live_parameters": h2,
            "offload_param": {"device": "cpu", "pin_memory": bool(pin_memory)},
        },
        "steps_per_print": 2000,
        "train_batch_size": batch_size,
        "wall_clock_breakdown": False,
    }
    if quant_bits != 16:
        cfg["weight_quantization"] = {"quantized_initialization": {
            "num_bits": quant_bits, "group_size": group_size, "group_dim": 1,
            "symmetric": False}}
    return cfg


def kv_batch(spec: ModelSpec, gpu_mem: int, prompt_len: int, gen_len: int,
             slack: int = GiB) -> int:
    """The largest batch whose GPU needs fit gpu_mem under ZeRO-3 (an estimate): per prompt the
    fp16 KV cache at prompt + gen and the prefill's activations (hidden states, q/k/v, the
    FFN's input and output, the last position's fp32 logits); fixed: ZeRO's live and prefetched
    parameters (2 x 2 h^2 fp16), the largest single parameter (the embedding) and slack."""
    h = spec.hidden_size
    per = (spec.kv_bytes_per_token(2) * (prompt_len + gen_len)
           + prompt_len * (4 * h + 2 * spec.ffn_dim) * 2 + spec.vocab_size * 4)
    fixed = 4 * h * h * 2 + spec.vocab_size * h * 2 + slack
    return max(0, (gpu_mem - fixed) // per)


def fill_zero3(model: torch.nn.Module, spec: ModelSpec, dtype: torch.dtype,
               device: torch.device) -> int:
    """Write flexrun's synthetic values into a ZeRO-3 partitioned model, one module at a time
    (gather, `_load_from_state_dict`, re-partition: how transformers loads ZeRO-3 checkpoints;
    with quantized_initialization the load quantizes them). Returns the tensors written."""
    import deepspeed
    embed = model.get_input_embeddings().weight
    tied = tied_names(model)
    shapes = spec.all_shapes()
    written = 0
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        sd, params = {}, []
        for pname, p in module.named_parameters(recurse=False):
            full = prefix + pname
            if full in tied and p is embed:
                continue                           # the embedding's own load fills it
            name = "embed.tokens" if full in tied else canonical_name(spec, full)
            if name is None or name not in shapes:
                raise KeyError(f"{full}: no flexrun weight of that name")
            sd[full] = synthetic_tensor(name, tuple(shapes[name]), device, dtype)
            params.append(p)
        if not params:
            continue
        errors: list[str] = []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            module._load_from_state_dict(sd, prefix, {}, True, [], [], errors)
        if errors:
            raise RuntimeError(f"loading {mod_name}: {errors}")
        written += len(sd)
        del sd
    return written


@contextlib.contextmanager
def _no_zero3_random_init():
    """Skip transformers' ZeRO-3 weight-init pass (every weight is written by fill_zero3)."""
    import transformers.integrations.deepspeed as tds
    old = getattr(tds, "initialize_weights_zero3", None)
    if old is not None:
        tds.initialize_weights_zero3 = lambda model: None
    try:
        yield old is not None
    finally:
        if old is not None:
            tds.initialize_weights_zero3 = old


def _init_distributed(backend: str = "nccl") -> None:
    """One process, one device: the environment the `deepspeed` launcher would set."""
    import deepspeed
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(backend)


def build(a: argparse.Namespace, spec: ModelSpec, cfg: dict, dtype: torch.dtype,
          device: str = "cuda"):
    """ZeRO-Inference's model: built under zero.Init, filled, wrapped by deepspeed.initialize
    (device "cpu" only for tests: DeepSpeed's CPU accelerator and gloo)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig
    if a.torch_dequant:
        import deepspeed.inference.quantization.utils as qu
        # DeQuantizer takes its kernel only where this device name is the accelerator's
        # (0.19.8: _get_device(); earlier: the module global `device`)
        qu._get_device = lambda: "torch-dequant"
        qu.device = "torch-dequant"
    _init_distributed("nccl" if device == "cuda" else "gloo")
    dschf = HfDeepSpeedConfig(cfg)          # must stay alive while transformers builds
    with _no_zero3_random_init() as skipped:
        model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=dtype)
    model.eval()
    written = fill_zero3(model, spec, dtype, torch.device(device))
    engine = deepspeed.initialize(model=model, config_params=cfg)[0]
    engine.module.eval()
    model = engine.module
    model.generation_config.eos_token_id = None     # exactly max_new_tokens
    return model, dschf, {"tensors_written": written, "random_init_skipped": skipped}


def versions() -> dict:
    import deepspeed
    import transformers
    return {"deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}


def run(a: argparse.Namespace) -> dict:
    """Build, warm up and time ZeRO-Inference; the result dict."""
    from bench.peers.accelerate_peer import _TokenTimes
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    spec = dummy_spec(a.model.removeprefix("dummy:"))
    if spec.arch != "opt":
        raise SystemExit("the DeepSpeed peer runs OPT shapes (as ZeRO-Inference's benchmarks)")
    dtype = torch.float16
    gpu_mem = parse_size(a.gpu_mem)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_mem / total))
    batch = (kv_batch(spec, gpu_mem, a.prompt_len, a.gen_len) if a.batch_size == "auto"
             else int(a.batch_size))
    if batch < 1:
        raise SystemExit(f"--gpu-mem {a.gpu_mem} holds no prompt's KV cache beside ZeRO's "
                         "live parameters")
    n = a.num_prompts or batch
    steps = a.gen_len - 1 if a.cut_gen_len is None else max(1, min(a.cut_gen_len, a.gen_len - 1))
    cfg = ds_config(spec.hidden_size, batch, pin_memory=a.pin_memory, quant_bits=a.quant_bits,
                    group_size=a.group_size)
    a.ds_config = cfg
    t0 = time.perf_counter()
    model, _keep, loaded = build(a, spec, cfg, dtype)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)          # the same prompts as bench.run_flexrun
    ids = torch.randint(10, min(spec.vocab_size, 30000), (n, a.prompt_len), generator=g)

    def gen(x: torch.Tensor, new: int, streamer=None) -> torch.Tensor:
        x = x.cuda()
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                              num_beams=1, max_new_tokens=new, pad_token_id=spec.pad_token_id,
                              streamer=streamer)
    with torch.no_grad():
        gen(ids[:1, :min(a.prompt_len, 32)], 2)           # warm-up: ZeRO-3 traces its fetches
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        prefill = decode = 0.0
        first = None
        for i in range(0, n, batch):
            st = _TokenTimes()
            ts = time.perf_counter()
            out = gen(ids[i:i + batch], steps + 1, st)
            torch.cuda.synchronize()
            te = time.perf_counter()
            tf = st.times[0] if st.times else te
            prefill += tf - ts
            decode += te - tf
            first = first if first is not None else out[0, a.prompt_len:].tolist()[:8]
    decode_full = decode * (a.gen_len - 1) / steps
    total_s = prefill + decode_full
    return {
        "model": f"dummy:{spec.name.split(':')[-1]}", "device": torch.cuda.get_device_name(0),
        "dtype": "float16", "versions": versions(), "ds_config": cfg,
        "mode": f"zero3-cpu-offload-int{a.quant_bits}" if a.quant_bits != 16
        else "zero3-cpu-offload-fp16",
        "dequant": ("torch" if a.torch_dequant else "deepspeed") if a.quant_bits != 16 else None,
        "left_out": LEFT_OUT, "load_s": load_s, **loaded,
        "gpu_mem_cap": a.gpu_mem, "batch_size": batch,
        "batch_rule": "kv_batch estimate" if a.batch_size == "auto" else "given",
        "num_prompts": n, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
        "decode_steps_run": steps, "extrapolated": steps < a.gen_len - 1,
        "decode_s_measured": decode, "decode_step_s": decode / (steps * -(-n // batch)),
        "prefill_s": prefill, "decode_s": decode_full, "total_s": total_s,
        "prefill_tok_s": n * a.prompt_len / prefill,
        "decode_tok_s": n * (a.gen_len - 1) / max(decode_full, 1e-9),
        "total_tok_s": n * a.gen_len / total_s,
        "peak_gpu_GB": torch.cuda.max_memory_allocated() / 1e9,
        "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "first_tokens": first, "args": {k: v for k, v in vars(a).items() if k != "ds_config"}}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="an OPT dummy preset: opt-6.7b, opt-30b, ...")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--cut-gen-len", type=int, default=None,
                    help="run this many decode steps and extrapolate to --gen-len")
    ap.add_argument("--batch-size", default="auto", help="a number, or auto (kv_batch)")
    ap.add_argument("--num-prompts", type=int, default=None, help="default: one batch")
    ap.add_argument("--gpu-mem", default="16GiB", help="the process's CUDA cap")
    ap.add_argument("--cpu-mem", default="100GiB", help="recorded only (ZeRO has no CPU cap)")
    ap.add_argument("--quant-bits", type=int, choices=[4, 8, 16], default=16,
                    help="4: ZeRO-Inference's 4-bit weights (quantized_initialization)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--no-pin-memory", dest="pin_memory", action="store_false",
                    help="offload_param.pin_memory false (DeepSpeed's choice for OPT-175B)")
    ap.add_argument("--torch-dequant", action="store_true",
                    default=os.environ.get("FLEXRUN_DS_TORCH_DEQUANT") == "1",
                    help="dequantize with torch ops instead of DeepSpeed's JIT CUDA kernel "
                    "(default: FLEXRUN_DS_TORCH_DEQUANT=1, which bench.run passes on)")
    return ap


def plain_arch_list(value: str | None) -> str | None:
    """TORCH_CUDA_ARCH_LIST without arch-specific suffixes ("9.0a" -> "9.0"): DeepSpeed
    0.19.8's op builder parses each entry as int.int and fails on the GPU image's "9.0a"
    (ValueError: invalid literal for int() with base 10: '0a') before its 4-bit dequantize
    kernel builds."""
    if not value:
        return value
    def plain(entry: str) -> str:
        ptx = entry.endswith("+PTX")
        return entry.removesuffix("+PTX").rstrip("af") + ("+PTX" if ptx else "")
    return " ".join(dict.fromkeys(plain(p) for p in value.replace(";", " ").split()))


def main() -> None:
    a = parser().parse_args()
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = plain_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])

    def said() -> dict:
        out = {"left_out": LEFT_OUT, "ds_config": getattr(a, "ds_config", None),
               "args": {k: v for k, v in vars(a).items() if k != "ds_config"}}
        with contextlib.suppress(Exception):
            out["versions"] = versions()
        return out
    run_and_report("DEEPSPEED_RESULT", lambda: run(a), said)


if __name__ == "__main__":
    main()
