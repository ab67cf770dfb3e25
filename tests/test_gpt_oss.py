"""gpt-oss specifics beyond the family tests (tests/test_families.py): the MXFP4 experts of its
Hub checkpoints, dequantized as transformers' own code does, and a checkpoint written that way
giving the tokens of transformers run on the same (dequantized) weights; the attention sinks
on the decode paths against the prefill."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_greedy, make_tokenizer, ragged_prompts
from families import perturb
from flexrun import LLM, Policy, SamplingParams
from flexrun.models.mxfp4 import FP4_VALUES, dequantize

GREEDY = SamplingParams(ignore_eos=True)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) values -> MXFP4 blocks (..., K / 32, 16) and scales (..., K / 32): per block of
    32 the power of two that brings its largest magnitude within 6, each value rounded to the
    nearest E2M1 code (a writer for the tests; the loader only reads)."""
    x = w.float().reshape(*w.shape[:-1], -1, 32)
    peak = x.abs().amax(-1).clamp_min(1e-30)
    exp = torch.ceil(torch.log2(peak / 6.0)).clamp(-127, 127)
    y = x / torch.exp2(exp)[..., None]
    lut = torch.tensor(FP4_VALUES)
    codes = (y[..., None] - lut).abs().argmin(-1).to(torch.uint8)    # ties: the lower code
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)


def test_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 10, 4), generator=g, dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)     # (3, 128, 10)
    torch.testing.assert_close(dequantize(blocks, scales, torch.float32),
                               ref.transpose(1, 2), rtol=0, atol=0)
    w = torch.randn(2, 5, 64, generator=g)
    back = dequantize(*quantize(w), torch.float32)
    assert (back - w).abs().max() <= w.abs().max() / 4       # a 4-bit code per value
    with pytest.raises(ValueError, match="do not match"):
        dequantize(blocks, scales[..., :3])


def _tiny(seed: int = 0):
    import transformers
    cfg = transformers.GptOssConfig(
        vocab_size=320, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=64,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
        max_position_embeddings=128, attention_dropout=0.0)
    torch.manual_seed(seed)
    return perturb(transformers.GptOssForCausalLM(cfg).eval())


@pytest.mark.parametrize("split", [False, True])
def test_mxfp4_checkpoint_gives_transformers_tokens(tmp_path, split):
    """Experts stored as the Hub files store them (MXFP4 blocks and scales; split: blocks and
    their scales in different shards): flexrun's tokens, resident and with the experts on
    the host and disk tiers, equal transformers' on the same weights dequantized."""
    from safetensors.torch import save_file
    m = _tiny()
    packed = {}
    with torch.no_grad():
        for j, layer in enumerate(m.model.layers):
            ex = layer.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(ex, name)                       # (E, in, out): x @ w
                blocks, scales = quantize(w.transpose(1, 2))
                getattr(ex, name).copy_(dequantize(blocks, scales, torch.float32)
                                        .transpose(1, 2))
                key = f"model.layers.{j}.mlp.experts.{name}"
                packed[key + "_blocks"], packed[key + "_scales"] = blocks, scales
    ref_dir = tmp_path / "ref"
    m.save_pretrained(str(ref_dir), safe_serialization=True)
    make_tokenizer(ref_dir)
    prompts = ragged_prompts(4, seed=7)
    ref = hf_greedy(ref_dir, prompts, 12)
    d = tmp_path / "mx"
    d.mkdir()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()
          if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    if split:
        scales = {k: v for k, v in packed.items() if k.endswith("_scales")}
        blocks = {k: v for k, v in packed.items() if k.endswith("_blocks")}
        save_file({**sd, **blocks}, str(d / "model-00001-of-00002.safetensors"))
        save_file(scales, str(d / "model-00002-of-00002.safetensors"))
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            **{k: "model-00001-of-00002.safetensors" for k in (*sd, *blocks)},
            **{k: "model-00002-of-00002.safetensors" for k in scales}}}))
    else:
        save_file({**sd, **packed}, str(d / "model.safetensors"))
    cfg = json.loads((ref_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (d / "config.json").write_text(json.dumps(cfg))
    make_tokenizer(d)
    with LLM(str(d), device="cpu", policy="resident") as llm:
        assert [o.output_ids for o in llm.generate(prompts, 12, GREEDY)] == ref
    pol = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=20, weights_cpu=40,
                 weights_disk=40, cpu_attention=True, cache_gpu=0, cache_cpu=100)
    (tmp_path / "off").mkdir()
    with LLM(str(d), device="cpu", policy=pol, offload_dir=str(tmp_path / "off")) as llm:
        assert [o.output_ids for o in llm.generate(prompts, 12, GREEDY)] == ref


def test_sinks_weigh_the_softmax():
    """A sink logit lowers every attention weight of its head by the same factor (it takes
    its share of the softmax and weighs no value): the matmul route against the plain one."""
    from flexrun.engine.attention import attend
    from flexrun.models.spec import AttentionOptions
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 3, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]                       # GQA: 4 query heads over 2 KV heads
    plain = attend(q, k, v, None, causal=True)
    sink = torch.tensor([-30.0, 0.0, 1.0, -30.0])
    sunk = attend(q, k, v, None, causal=True, opts=AttentionOptions(sink=sink))
    scores = torch.matmul(q, k.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)       # (b, heads, s)
    share = torch.sigmoid(lse - sink[None, :, None])                   # Z / (Z + e^sink)
    want = plain.view(2, 3, 4, 8) * share.transpose(1, 2)[..., None]
    torch.testing.assert_close(sunk.view(2, 3, 4, 8), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ttype", ["f32", "mxfp4"])
def test_gguf_gives_transformers_tokens(tmp_path, ttype):
    """A GGUF written as llama.cpp's GptOssModel writes it (experts de-interleaved and
    transposed, MXFP4 where asked, sinks, router and expert biases, yarn): flexrun's tokens
    from it equal transformers' on the original weights (rounded as the file stores them)."""
    from flexrun.models.gguf import gguf_config
    from gguf_writer import stored_value, write_gguf_like_llama_cpp
    m = _tiny(seed=2)
    if ttype == "mxfp4":      # the reference holds the experts as the file rounds them
        with torch.no_grad():
            for layer in m.model.layers:
                ex = layer.mlp.experts
                for name in ("gate_up_proj", "down_proj"):
                    w = getattr(ex, name).transpose(1, 2)       # (E, out, in) as stored
                    back = stored_value(w.numpy(), ttype, "blk.0.ffn_gate_exps.weight")
                    getattr(ex, name).copy_(torch.from_numpy(back).transpose(1, 2))
    path = write_gguf_like_llama_cpp(m, tmp_path / "g.gguf", tensor_type=ttype)
    cfg = gguf_config(path)
    assert cfg["model_type"] == "gpt_oss" and cfg["layer_types"] == m.config.layer_types
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (4, 2)
    ref_dir = tmp_path / "ref"
    m.save_pretrained(str(ref_dir), safe_serialization=True)
    prompts = ragged_prompts(4, seed=9)
    ref = hf_greedy(ref_dir, prompts, 12)
    with LLM(str(path), device="cpu", policy="resident") as llm:
        assert llm.spec.attn_sinks and llm.spec.expert_bias
        assert [o.output_ids for o in llm.generate(prompts, 12, GREEDY)] == ref


@pytest.mark.parametrize("causal", [True, False])
def test_long_prefill_runs_its_queries_in_chunks(monkeypatch, causal):
    """Soft-capped or sunk attention (two matmuls, fp32 scores) takes a long prefill's queries
    a few at a time within MATMUL_SCORES_BYTES: the same output, bit for bit."""
    from flexrun.engine import attention as A
    from flexrun.models.spec import AttentionOptions
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 37, 8, generator=g), *torch.randn(2, 2, 2, 37, 8, generator=g)
    mask = None if causal else (torch.rand(2, 1, 37, 37, generator=g) > 0.3) | torch.eye(
        37, dtype=torch.bool)
    for opts in (AttentionOptions(softcap=5.0), AttentionOptions(sink=torch.randn(4, generator=g))):
        whole = A.attend(q, k, v, mask, causal=causal, opts=opts)
        monkeypatch.setattr(A, "MATMUL_SCORES_BYTES", 2 * 4 * 37 * 4 * 3 * 5)   # 5 queries
        assert torch.equal(A.attend(q, k, v, mask, causal=causal, opts=opts), whole)
        monkeypatch.undo()


def test_gguf_pre_tokenizers_split_as_llama_cpp_or_refuse():
    """GPT-2's split for the pre-types llama.cpp gives it (gpt-2, olmo, mpt, ...); a split
    flexrun does not rebuild (gpt-4o's) is refused rather than approximated."""
    from flexrun.models.gguf_tokenizer import _pre_tokenizer
    for pre in ("gpt-2", "olmo", "mpt", "default", None):
        assert _pre_tokenizer(pre) is not None
    with pytest.raises(ValueError, match="pre-type 'gpt-4o'"):
        _pre_tokenizer("gpt-4o")
