"""Test helper: turn a GGUF file into a plain fp32 HF checkpoint directory with transformers."""
from __future__ import annotations

from pathlib import Path

import torch


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize `gguf_path` with transformers and save it (safetensors + tokenizer) to out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    kw = dict(gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), torch_dtype=torch.float32,
                                                 **kw).eval()
    model.hf_quantizer = None                    # weights are already dequantized fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw).save_pretrained(str(out_dir))
    return out_dir
