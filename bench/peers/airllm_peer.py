"""Run AirLLM on a Llama checkpoint of flexrun's synthetic weights; print one JSON line.

python -m bench.peers.airllm_peer --model llama3-8b --prompt-len 512 --gen-len 32 \
    --gpu-mem 4GiB [--batch-size auto|24,16,8] [--cut-gen-len 4] [--compression 4bit]
python -m bench.peers.airllm_peer --model llama3-8b --write-only     # the checkpoint alone

AirLLM (PyPI `airllm`, 4.0.0 read here) splits a HF checkpoint into one safetensors file per
module (embedding, each decoder layer, final norm, lm_head) on first use, builds the
transformers model on the meta device and, with forward hooks, streams each module from disk
to the GPU right before it runs and frees it after (the next module read ahead on a thread
into pinned memory). transformers runs generate(); its DynamicCache keeps the KV cache on the
GPU. API: `airllm.AutoModel.from_pretrained(path, device="cuda:0", dtype=..., max_seq_len=...,
compression=None|"4bit"|"8bit", prefetching=True)`, then `model.generate(input_ids, ...)`.
`max_seq_len` is stored but unused in 4.0.0 (the cache grows to prompt + gen); it is set to
prompt + gen as the issue asks. compression quantizes the split copy with bitsandbytes (NF4,
blocks of 64; 8-bit blockwise) and turns prefetching off; bitsandbytes is imported inside a
try (optional), as are the model families that need sentencepiece; `import airllm` needs
torch, transformers, accelerate, safetensors, huggingface_hub, tqdm (optimum is not used).
AirLLM reads a tokenizer at load; the runs pass token ids, so get_tokenizer returns None.

Checkpoint: flexrun's synthetic values (bench/peers/hf_shapes.py: the same names and values
as `dummy:<preset>`) written once as fp16 safetensors, one shard per module, under
$FLEXRUN_PEER_CKPT/<preset> (default /tmp/flexrun-peer-ckpt). AirLLM 4 links a shard that holds
exactly one module instead of copying it, so the split costs no second copy (llama3-8b 16.1 GB,
llama-13b 26.0 GB; a checkpoint sharded otherwise doubles: 26 + 26 GB for 13B); the result
says whether it linked. flexrun reads the same directory.

Budget: AirLLM has no memory argument; the process is capped at --gpu-mem with
torch.cuda.set_per_process_memory_fraction (as AirLLM's own test_streaming_gpu.py does).
--batch-size auto tries the largest batch airllm_batch() estimates, then smaller ones, each
with a prefill and one decode step, and keeps the first that fits (AirLLM's time per forward
hardly depends on the batch, so the largest batch that fits is its best). The page cache is
dropped before the measured run (`echo 3 > /proc/sys/vm/drop_caches`; the result says if it
could not), so it starts from disk. --cut-gen-len N runs N decode steps and extrapolates.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time
from pathlib import Path

import torch

from bench.peers.hf_shapes import hf_config, synthetic_value
from bench.peers.report import run_and_report
from flexrun.config import parse_size
from flexrun.models.dummy import dummy_spec
from flexrun.models.spec import ModelSpec

CKPT_ROOT = os.environ.get("FLEXRUN_PEER_CKPT", "/tmp/flexrun-peer-ckpt")
SLACK = 1 << 29


def module_of(hf_name: str) -> str:
    """The streamed module a Llama weight belongs to (AirLLM's split unit)."""
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return ".".join(parts[:3])
    return ".".join(parts[:-1])


def write_checkpoint(spec: ModelSpec, out: Path) -> dict:
    """Write spec's synthetic weights as an fp16 HF checkpoint, one safetensors shard per
    module, config.json and model.safetensors.index.json (written last: its presence means
    complete, and a second call returns at once). Returns what it wrote."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    index_path = out / "model.safetensors.index.json"
    if index_path.is_file():
        idx = json.loads(index_path.read_text())
        return {"path": str(out), "written": False, "bytes": idx["metadata"]["total_size"],
                "shards": len(set(idx["weight_map"].values()))}
    cfg = hf_config(spec)
    cfg.architectures = ["LlamaForCausalLM"] if spec.arch == "llama" else None
    setattr(cfg, "dtype" if hasattr(cfg, "dtype") else "torch_dtype", "float16")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    params = {k: tuple(p.shape) for k, p in model.state_dict(keep_vars=True).items()
              if isinstance(p, torch.nn.Parameter)}
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if spec.tie_word_embeddings \
        else set()
    groups: dict[str, list[str]] = {}
    for name in params:
        if name not in tied:
            groups.setdefault(module_of(name), []).append(name)
    need = sum(2 * torch.Size(params[n]).numel() for g in groups.values() for n in g)
    out.mkdir(parents=True, exist_ok=True)
    free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
    if free < need:
        raise OSError(f"{out}: {need / 1e9:.1f} GB to write, {free / 1e9:.1f} GB free")
    cfg.save_pretrained(out)
    weight_map, total = {}, 0
    for i, (mod, names) in enumerate(groups.items(), 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: synthetic_value(spec, n, params[n]).contiguous() for n in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({n: fname for n in names})
        del tensors
    index_path.write_text(json.dumps({"metadata": {"total_size": total},
                                      "weight_map": weight_map}, indent=1))
    return {"path": str(out), "written": True, "bytes": total, "shards": len(groups)}


def drop_page_cache() -> str:
    """Drop the kernel's page cache (root); what happened, in words."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "dropped"
    except OSError as e:
        return f"could not drop the page cache: {e}"


def airllm_batch(spec: ModelSpec, cap: int, prompt_len: int, gen_len: int) -> int:
    """The largest batch an AirLLM process capped at `cap` bytes should hold (an estimate):
    per prompt its fp16 KV cache and the prefill's activations (hidden states, q/k/v, the MLP's
    gate / up / product, the last position's fp32 logits); fixed: the largest module streamed
    to the GPU (lm_head or embedding: vocab x hidden fp16, or one decoder layer) and slack."""
    h = spec.hidden_size
    per = (spec.kv_bytes_per_token(2) * (prompt_len + gen_len)
           + prompt_len * (4 * h + 3 * spec.ffn_dim) * 2 + spec.vocab_size * 4)
    fixed = max(spec.vocab_size * h, spec.layer_params(0)) * 2 + SLACK
    return max(0, (cap - fixed) // per)


def candidates(batch: str, estimate: int) -> list[int]:
    """Batches to try, largest first: a given comma list, or the estimate and fractions of it."""
    if batch != "auto":
        return sorted({int(b) for b in batch.split(",")}, reverse=True)
    return sorted({max(1, estimate * k // 4) for k in (4, 3, 2, 1)} | {1}, reverse=True)


def import_airllm():
    """airllm, quietly: optional families warn when their extras (sentencepiece) are missing."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import airllm
    from airllm.airllm_base import AirLLMBaseModel
    AirLLMBaseModel.get_tokenizer = lambda self, hf_token=None: None   # ids are passed in
    return airllm


def split_mode(ckpt: Path, air) -> str:
    """How AirLLM's split copy relates to the checkpoint: linked (same inode) or copied."""
    split = Path(air.checkpoint_path)
    first = next(iter(sorted(split.glob("*.safetensors"))), None)
    if first is None:
        return "unknown"
    return "linked" if first.stat().st_nlink > 1 or first.is_symlink() else "copied"


def _reset_after_oom(air) -> None:
    """Free what a failed forward left on the GPU (a streamed module, a read-ahead, the cache)."""
    for idx in getattr(air, "_streamed_indices", []):
        air.layers[idx].to("meta")
    air._prefetch_future = None
    air._prefetched_idx = None
    gc.collect()
    torch.cuda.empty_cache()


def run(a: argparse.Namespace) -> dict:
    """Write the checkpoint if needed, load AirLLM, find its batch, time one run."""
    from bench.peers.accelerate_peer import _TokenTimes
    spec = dummy_spec(a.model.removeprefix("dummy:"))
    ckpt = Path(a.checkpoint or Path(CKPT_ROOT) / spec.name.split(":")[-1])
    t0 = time.perf_counter()
    written = write_checkpoint(spec, ckpt)
    write_s = time.perf_counter() - t0
    if a.write_only:
        return {"checkpoint": written, "write_s": write_s}
    airllm = import_airllm()
    cuda = torch.cuda.is_available() and a.device.startswith("cuda")
    cap = parse_size(a.gpu_mem)
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    t0 = time.perf_counter()
    air = airllm.AutoModel.from_pretrained(str(ckpt), device=a.device, dtype=torch.float16,
                                           max_seq_len=a.prompt_len + a.gen_len,
                                           compression=a.compression)
    air.model.generation_config.eos_token_id = None          # exactly max_new_tokens
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)                      # bench.run_flexrun's prompts
    est = airllm_batch(spec, cap, a.prompt_len, a.gen_len)
    tries = candidates(a.batch_size, est)
    ids = torch.randint(10, min(spec.vocab_size, 30000), (max(tries), a.prompt_len), generator=g)
    pad = spec.pad_token_id if spec.pad_token_id is not None else spec.eos_token_ids[0]

    def gen(b: int, new: int, streamer=None) -> torch.Tensor:
        x = ids[:b].to(a.device)
        return air.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                            max_new_tokens=new, use_cache=True, pad_token_id=pad,
                            streamer=streamer)
    probes, batch = [], None
    with torch.inference_mode():
        for b in tries:
            t1 = time.perf_counter()
            try:
                gen(b, 2)
                probes.append({"batch": b, "fits": True, "s": time.perf_counter() - t1})
                batch = b
                break
            except torch.cuda.OutOfMemoryError as e:
                probes.append({"batch": b, "fits": False, "error": str(e).split("\n")[0][:300]})
                _reset_after_oom(air)
        if batch is None:
            raise RuntimeError(f"no batch of {tries} fits {a.gpu_mem}: {probes}")
        steps = a.gen_len - 1 if a.cut_gen_len is None else max(1, min(a.cut_gen_len,
                                                                       a.gen_len - 1))
        cache = drop_page_cache()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        st = _TokenTimes()
        ts = time.perf_counter()
        out = gen(batch, steps + 1, st)
        if cuda:
            torch.cuda.synchronize()
        te = time.perf_counter()
    tf = st.times[0] if st.times else te
    prefill, decode = tf - ts, te - tf
    decode_full = decode * (a.gen_len - 1) / steps
    total_s = prefill + decode_full
    import transformers
    return {
        "model": f"dummy:{spec.name.split(':')[-1]}", "checkpoint": written,
        "checkpoint_write_s": write_s, "split": split_mode(ckpt, air),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "dtype": "float16",
        "versions": {"airllm": getattr(airllm, "__version__", None) or _dist_version("airllm"),
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "compression": a.compression, "prefetching": bool(getattr(air, "prefetching", None)),
        "max_seq_len": a.prompt_len + a.gen_len, "gpu_mem_cap": a.gpu_mem,
        "batch_estimate": est, "batch_probes": probes, "batch_size": batch,
        "num_prompts": batch, "page_cache": cache, "load_s": load_s,
        "prompt_len": a.prompt_len, "gen_len": a.gen_len, "decode_steps_run": steps,
        "extrapolated": steps < a.gen_len - 1, "decode_s_measured": decode,
        "decode_step_s": decode / steps, "prefill_s": prefill, "decode_s": decode_full,
        "total_s": total_s, "prefill_tok_s": batch * a.prompt_len / prefill,
        "decode_tok_s": batch * (a.gen_len - 1) / max(decode_full, 1e-9),
        "total_tok_s": batch * a.gen_len / total_s,
        "peak_gpu_GB": torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
        "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "first_tokens": out[0, a.prompt_len:a.prompt_len + 8].tolist(), "args": vars(a)}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a Llama dummy preset: llama3-8b, llama-13b")
    ap.add_argument("--checkpoint", default=None, help="default: $FLEXRUN_PEER_CKPT/<preset>")
    ap.add_argument("--write-only", action="store_true", help="write the checkpoint and stop")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--cut-gen-len", type=int, default=None,
                    help="run this many decode steps and extrapolate to --gen-len")
    ap.add_argument("--batch-size", default="auto", help="auto, or batches to try: 24,16,8")
    ap.add_argument("--gpu-mem", default="4GiB", help="the process's CUDA cap")
    ap.add_argument("--cpu-mem", default="100GiB", help="recorded only (AirLLM has no CPU cap)")
    ap.add_argument("--compression", choices=["4bit", "8bit"], default=None,
                    help="AirLLM's bitsandbytes compression of its split copy")
    ap.add_argument("--device", default="cuda:0")
    return ap


def main() -> None:
    a = parser().parse_args()
    run_and_report("AIRLLM_RESULT", lambda: run(a), lambda: {"args": vars(a)})


if __name__ == "__main__":
    main()
