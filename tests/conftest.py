"""Fixtures: tiny random OPT / Llama checkpoints saved by transformers, with a tokenizer.json;
the real SmolLM2 GGUF (skipped when it cannot be fetched), loaded by transformers and saved as an
fp32 HF directory once per session."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

VOCAB = 320


def run_triton_check(code: str) -> None:
    """Run a Triton check script in a child process: on CUDA, or on the CPU through Triton's
    interpreter (TRITON_INTERPRET is read at import). It must exit 0 and print ok."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, this is flexrun",
          "offloading weights to disk and cpu memory", "a b c d e f g 0 1 2 3 4 5 6 7 8 9"]


def make_tokenizer(path: Path, vocab: int = VOCAB) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 4, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))


def _save(model, path: Path) -> Path:
    model.save_pretrained(str(path), safe_serialization=True)
    make_tokenizer(path)
    return path


def tiny_opt(path: Path, post_ln: bool = False, seed: int = 0) -> Path:
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                    ffn_dim=128, max_position_embeddings=128, do_layer_norm_before=not post_ln,
                    word_embed_proj_dim=32 if post_ln else 64, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    m = OPTForCausalLM(cfg).eval()
    with torch.no_grad():   # random biases and norms so every term matters
        for n, p in m.named_parameters():
            if n.endswith("bias") or "layer_norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return _save(m, path)


def tiny_llama(path: Path, kv_heads: int = 2, tie: bool = False, seed: int = 0,
               rope_scaling: dict | None = None, layers: int = 3) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
                      rope_scaling=rope_scaling)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return _save(m, path)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def opt_dir(models_dir) -> Path:
    return tiny_opt(models_dir / "opt")


@pytest.fixture(scope="session")
def opt350_dir(models_dir) -> Path:
    return tiny_opt(models_dir / "opt350", post_ln=True)


@pytest.fixture(scope="session")
def llama_dir(models_dir) -> Path:
    return tiny_llama(models_dir / "llama")


@pytest.fixture(scope="session", params=["opt", "opt350", "llama"])
def any_model_dir(request, opt_dir, opt350_dir, llama_dir) -> Path:
    return {"opt": opt_dir, "opt350": opt350_dir, "llama": llama_dir}[request.param]


def ragged_prompts(n: int = 5, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [3, 11, 7, 1, 16, 5, 9, 2][:n]
    return [torch.randint(3, VOCAB, (L,), generator=g).tolist() for L in lens]


def hf_greedy(model_dir: Path, prompts: list[list[int]], new: int,
              dtype: torch.dtype = torch.float32, model_cls=None) -> list[list[int]]:
    """transformers' own greedy generate, one prompt at a time (no padding involved). EOS
    neither stops it nor is suppressed (min_new_tokens would mask EOS's logit, which
    ignore_eos does not do), so every new token is the argmax. model_cls: a class
    AutoModelForCausalLM does not map (image-text checkpoints)."""
    from transformers import AutoModelForCausalLM
    m = (model_cls or AutoModelForCausalLM).from_pretrained(str(model_dir), dtype=dtype).eval()
    m.generation_config.eos_token_id = None
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            g = m.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
        outs.append(g[0, len(p):].tolist())
    return outs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the real model: SmolLM2-135M-Instruct (GGUF) -------------------------------------------
@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    env = os.environ.get("FLEXRUN_SMOLLM2_GGUF")
    if env and Path(env).is_file():
        return Path(env)
    from flexrun.models.smollm2 import ensure_smollm2
    try:
        return ensure_smollm2()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")


@pytest.fixture(scope="session")
def hf_gguf_model(smollm2_gguf):
    """transformers' own fp32 model from the GGUF (its GGUF loader, ~30 s on 2 cores)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_hf_dir(hf_gguf_model, hf_gguf_tokenizer, tmp_path_factory) -> Path:
    """hf_gguf_model saved as a plain fp32 safetensors HF directory (converted once)."""
    from hf_from_gguf import save_fp32
    return save_fp32(hf_gguf_model, hf_gguf_tokenizer, tmp_path_factory.mktemp("smollm2_hf"))


def same_to_fp32(got, want) -> bool:
    """Equal JSON values: the same keys, ids, tokens, texts and finish reasons; floats
    (logprobs) within fp32 rounding (a batch of other rows may round the last bit
    differently)."""
    if isinstance(want, float):
        return isinstance(got, float) and got == pytest.approx(want, abs=1e-5)
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and \
            all(same_to_fp32(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and \
            all(same_to_fp32(g, w) for g, w in zip(got, want))
    return got == want
