"""Run HF Accelerate offloading on a flexrun dummy shape and print one JSON line of its figures.

python -m bench.peers.accelerate_peer --model opt-1.3b --prompt-len 512 --gen-len 32 \
    --batch-size 8 --num-prompts 8 --cpu-mem 1GiB [--gpu-mem 16GiB] [--device cpu|cuda]
Accelerate's big-model route: an empty OPTForCausalLM (`init_empty_weights`), a device map from
`infer_auto_device_map(max_memory=...)`, flexrun's own synthetic values (same names, same
values: both systems run the same weights) put where the map says, disk ones in an offload
folder, then `dispatch_model(..., offload_dir=...)`: what does not fit the GPU / CPU budget
goes to disk. Needs transformers and accelerate (bench extras, never runtime dependencies).
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

from flexrun.config import parse_size
from flexrun.models.dummy import dummy_spec, synthetic_tensor
from flexrun.models.loader import canonical_name
from flexrun.models.spec import ModelSpec


OPT_NAMES = dummy_spec("opt-125m")        # canonical_name reads only the architecture


def hf_config(spec: ModelSpec):
    """The transformers OPTConfig of a flexrun OPT spec (same shape, same token ids)."""
    from transformers import OPTConfig
    if spec.arch != "opt":
        raise SystemExit(f"the Accelerate peer runs OPT shapes only, not {spec.arch}")
    return OPTConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                     num_hidden_layers=spec.num_layers, ffn_dim=spec.ffn_dim,
                     num_attention_heads=spec.num_heads, max_position_embeddings=spec.max_positions,
                     do_layer_norm_before=spec.do_layer_norm_before,
                     word_embed_proj_dim=spec.embed_dim,
                     _remove_final_layer_norm=not spec.final_layer_norm,
                     pad_token_id=spec.pad_token_id, bos_token_id=spec.bos_token_id,
                     eos_token_id=spec.eos_token_ids[0], dropout=0.0, tie_word_embeddings=True)


def materialize(model: torch.nn.Module, device_map: dict, offload_dir: Path,
                dtype: torch.dtype) -> dict:
    """Fill the empty model with flexrun's synthetic weights (same names, same values) where
    the device map puts them: GPU / CPU tensors in place, disk ones written one at a time to
    accelerate's offload folder (index.json + .dat memmaps), the state that
    `load_checkpoint_and_dispatch(..., offload_folder=...)` leaves. Never holds the model."""
    from accelerate.utils import offload_weight, save_offload_index, set_module_tensor_to_device
    index: dict = {}
    moved: Counter = Counter()
    tied = set(getattr(model, "_tied_weights_keys", None) or ["lm_head.weight"])
    for hf_name, p in model.state_dict(keep_vars=True).items():
        name = canonical_name(OPT_NAMES, hf_name) if hf_name not in tied else "embed.tokens"
        if name is None:
            continue
        dev = device_map.get("", None)
        for mod, d in device_map.items():       # the longest module prefix decides
            if mod and (hf_name == mod or hf_name.startswith(mod + ".")):
                dev = d
        if hf_name in tied and dev != "disk":
            continue                          # tie_weights() below shares the embedding
        t = synthetic_tensor(name, tuple(p.shape), torch.device("cpu")).to(dtype)
        if dev == "disk":                     # a tied copy on disk is a second file
            index = offload_weight(t, hf_name, str(offload_dir), index=index)
        else:
            set_module_tensor_to_device(model, hf_name, dev, value=t)
        moved["gpu" if isinstance(dev, int) else str(dev)] += t.numel() * t.element_size()
        del t
    save_offload_index(index, str(offload_dir))
    model.tie_weights()
    return {k: v / 1e9 for k, v in moved.items()}


def placement_summary(device_map: dict, num_layers: int) -> dict:
    """Decoder layers per device (gpu / cpu / disk), and where the other modules went."""
    def kind(d) -> str:
        return "gpu" if isinstance(d, int) or str(d).startswith("cuda") else str(d)
    layers: Counter = Counter()
    other = {}
    for mod, d in device_map.items():
        m = re.search(r"(?:^|\.)layers(?:\.(\d+))?(?:\.|$)", mod)
        if mod == "":
            layers[kind(d)] += num_layers          # the whole model on one device
        elif m is None:
            other[mod] = kind(d)
        elif m.group(1) is None:
            layers[kind(d)] += num_layers          # the whole ModuleList on one device
        elif mod.endswith(f"layers.{m.group(1)}"):
            layers[kind(d)] += 1
    return {"layers": dict(layers), "other": other}


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives (end of prefill)."""

    def __init__(self) -> None:
        self.calls, self.t_first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.t_first = time.perf_counter()

    def end(self) -> None:
        pass


def run(a: argparse.Namespace) -> dict:
    """Build, dispatch, warm up and time Accelerate; the result dict."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from transformers import OPTForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.num_prompts = a.num_prompts or a.batch_size
    cuda = a.device == "cuda"
    dtype = getattr(torch, a.dtype) if a.dtype else torch.float16 if cuda else torch.float32
    spec = dummy_spec(a.model.removeprefix("dummy:"))
    work = Path(tempfile.mkdtemp(prefix="accel-peer-", dir=a.offload_dir))
    try:
        t0 = time.perf_counter()
        with init_empty_weights():
            model = OPTForCausalLM(hf_config(spec))
        model.tie_weights()
        max_memory: dict = {"cpu": parse_size(a.cpu_mem)}
        if cuda:
            max_memory[0] = parse_size(a.gpu_mem)
        device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=dtype,
                                           no_split_module_classes=["OPTDecoderLayer"])
        placed_GB = materialize(model, device_map, work, dtype)
        t1 = time.perf_counter()
        model = dispatch_model(model, device_map=device_map, offload_dir=str(work))
        model.eval()
        load_s = time.perf_counter() - t1
        main = torch.device("cuda:0" if cuda else "cpu")
        g = torch.Generator().manual_seed(0)   # the same prompts as bench.run_flexrun
        ids = torch.randint(10, min(spec.vocab_size, 30000), (a.num_prompts, a.prompt_len),
                            generator=g)
        kw = dict(do_sample=False, num_beams=1, pad_token_id=spec.pad_token_id)

        def gen(x: torch.Tensor, n: int, streamer=None) -> torch.Tensor:
            x = x.to(main)
            return model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                  max_new_tokens=n, min_new_tokens=n, streamer=streamer, **kw)
        with torch.inference_mode():
            gen(ids[:1, :min(a.prompt_len, 32)], 2)               # warm-up: every hook, once
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            prefill = decode = 0.0
            first = None
            for i in range(0, a.num_prompts, a.batch_size):
                st = _FirstToken()
                ts = time.perf_counter()
                out = gen(ids[i:i + a.batch_size], a.gen_len, st)
                if cuda:
                    torch.cuda.synchronize()
                te = time.perf_counter()
                tf = st.t_first or te
                prefill += tf - ts
                decode += te - tf
                if first is None:
                    first = out[0, a.prompt_len:].tolist()
        n, total = a.num_prompts, prefill + decode
        return {
            "model": f"dummy:{spec.name.split(':')[-1]}", "device": torch.cuda.get_device_name(0)
            if cuda else "cpu", "dtype": str(dtype).removeprefix("torch."),
            "placement": placement_summary(device_map, spec.num_layers), "weights_GB": placed_GB,
            "setup_s": t1 - t0, "load_s": load_s, "prompt_len": a.prompt_len,
            "gen_len": a.gen_len, "num_prompts": n, "batch_size": a.batch_size,
            "prefill_s": prefill, "decode_s": decode, "total_s": total,
            "prefill_tok_s": n * a.prompt_len / prefill,
            "decode_tok_s": n * (a.gen_len - 1) / max(decode, 1e-9),
            "total_tok_s": n * a.gen_len / total,
            "peak_gpu_GB": torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
            "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "first_tokens": first[:8], "args": vars(a)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a flexrun dummy OPT preset, e.g. opt-1.3b")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-prompts", type=int, default=None, help="default: one batch")
    ap.add_argument("--gpu-mem", default="16GiB")
    ap.add_argument("--cpu-mem", default="1GiB")
    ap.add_argument("--offload-dir", default=None, help="parent of the temporary folder")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: float16 on CUDA, float32 on the CPU (as flexrun)")
    return ap


def main() -> None:
    a = parser().parse_args()
    print("ACCELERATE_RESULT " + json.dumps(run(a), default=str), flush=True)


if __name__ == "__main__":
    main()
