"""Test helper: turn a GGUF file into a plain fp32 HF checkpoint directory with transformers."""
from __future__ import annotations

from pathlib import Path

import torch


def save_fp32(model, tokenizer, out_dir: str | Path) -> Path:
    """Save a transformers model loaded from a GGUF (already fp32) plus its tokenizer to out_dir.

    The GGUF quantizer marks the model unserializable; it is detached only while saving, so the
    model stays usable (and unchanged) for the caller."""
    out_dir = Path(out_dir)
    quantizer = getattr(model, "hf_quantizer", None)
    qcfg = getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None                    # weights are already dequantized fp32
    if qcfg is not None:
        del model.config.quantization_config
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        model.hf_quantizer = quantizer
        if qcfg is not None:
            model.config.quantization_config = qcfg
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize `gguf_path` with transformers and save it (safetensors + tokenizer) to out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_path = Path(gguf_path)
    kw = dict(gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), torch_dtype=torch.float32,
                                                 **kw).eval()
    return save_fp32(model, AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw), out_dir)
