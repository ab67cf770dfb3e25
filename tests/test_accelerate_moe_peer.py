"""The Accelerate peer on tiny Mixtral, Qwen3-MoE and Llama shapes: runs on CPU with part of the
model on disk, and its greedy tokens are flexrun's (same synthetic weights, same prompts; the
MoE presets route by their router here, as transformers does)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

TINY = {
    "mixtral-tiny": {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2,
                     "intermediate_size": 96, "num_local_experts": 4, "num_experts_per_tok": 2,
                     "vocab_size": 512, "rope_theta": 1e6, "max_position_embeddings": 256,
                     "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "bos_token_id": 1,
                     "eos_token_id": 2},
    "qwen3-moe-tiny": {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                       "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8,
                       "num_experts_per_tok": 2, "norm_topk_prob": True, "vocab_size": 512,
                       "rope_theta": 1e6, "max_position_embeddings": 256,
                       "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "eos_token_id": 3},
}


@pytest.fixture
def tiny_presets(monkeypatch):
    from flexrun.models import dummy
    for name, cfg in TINY.items():
        monkeypatch.setitem(dummy._FAMILIES, name, cfg)
    monkeypatch.setitem(dummy._LLAMA, "llama-tiny", (64, 2, 4, 2, 128, 512, 10000.0))
    monkeypatch.setenv(dummy.ROUTING_ENV, "router")


def _flexrun_tokens(name: str, n: int) -> list[int]:
    from flexrun import LLM, SamplingParams
    g = torch.Generator().manual_seed(0)             # the peer's (and run_flexrun's) prompts
    ids = torch.randint(10, 512, (2, 8), generator=g).tolist()
    with LLM(f"dummy:{name}", device="cpu", policy="resident") as llm:
        return llm.generate(ids, n, SamplingParams(ignore_eos=True))[0].output_ids


# the CPU budgets that keep the embedding and layer 0 on the CPU, layer 1 and the head on disk
@pytest.mark.parametrize("name,cpu_mem", [("mixtral-tiny", "850KB"), ("qwen3-moe-tiny", "850KB"),
                                          ("llama-tiny", "450KB")])
def test_peer_disk_offload_matches_flexrun(tiny_presets, tmp_path, name, cpu_mem) -> None:
    from bench.peers.accelerate_peer import parser, run
    r = run(parser().parse_args([
        "--model", name, "--prompt-len", "8", "--gen-len", "5", "--batch-size", "2",
        "--cpu-mem", cpu_mem, "--device", "cpu", "--offload-dir", str(tmp_path)]))
    assert r["placement"]["layers"] == {"cpu": 1, "disk": 1}
    assert r["placement"]["other"]["lm_head"] == "disk"
    assert r["device_map_bytes"]["cpu"] > 0 and r["device_map_bytes"]["disk"] > 0
    assert r["decode_steps_run"] == 4 and r["extrapolated"] is False
    assert r["total_tok_s"] > 0 and r["prefill_s"] > 0 and r["decode_s"] > 0
    assert set(r["versions"]) == {"transformers", "accelerate", "torch"}
    assert list(tmp_path.iterdir()) == []            # the offload folder is gone
    assert r["first_tokens"] == _flexrun_tokens(name, 5)


def test_cut_gen_len_extrapolates_decode(tiny_presets, tmp_path) -> None:
    from bench.peers.accelerate_peer import parser, run
    r = run(parser().parse_args([
        "--model", "mixtral-tiny", "--prompt-len", "8", "--gen-len", "9", "--cut-gen-len", "2",
        "--batch-size", "2", "--num-prompts", "4", "--cpu-mem", "1GiB", "--device", "cpu",
        "--experts-impl", "eager", "--offload-dir", str(tmp_path)]))
    assert r["extrapolated"] is True and r["decode_steps_run"] == 2
    assert r["experts_implementation"] == "eager"
    assert r["decode_s"] == pytest.approx(r["decode_s_measured"] * 8 / 2)
    assert r["decode_tok_s"] == pytest.approx(4 * 8 / r["decode_s"])
    assert r["first_tokens"] == _flexrun_tokens("mixtral-tiny", 3)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b", "qwen2-57b-a14b"])
def test_full_size_configs_match_flexrun_shapes(name) -> None:
    """Every parameter of the transformers model has flexrun's values under the same shape."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from bench.peers.hf_shapes import hf_config
    from flexrun.models.dummy import dummy_spec
    from flexrun.models.loader import canonical_name
    spec = dummy_spec(name)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config(spec))
    state = model.state_dict()
    assert sum(p.numel() for p in state.values()) == spec.num_params()
    shapes = spec.all_shapes()
    for hf_name, p in state.items():
        c = canonical_name(spec, hf_name)
        assert c is not None, hf_name
        if c.endswith(("experts.gate_up.weight", "experts.down.weight")):
            f, h = spec.expert_ffn_dim, spec.hidden_size
            want = (spec.num_experts, 2 * f, h) if "gate_up" in c else (spec.num_experts, h, f)
            assert tuple(p.shape) == want, hf_name
        else:
            assert tuple(p.shape) == shapes[c], hf_name


def test_stacked_experts_hold_flexruns_per_expert_values(tiny_presets) -> None:
    from bench.peers.hf_shapes import synthetic_value
    from flexrun.models.dummy import dummy_spec, synthetic_tensor
    spec = dummy_spec("mixtral-tiny")
    cpu = torch.device("cpu")
    gate_up = synthetic_value(spec, "model.layers.1.mlp.experts.gate_up_proj", (4, 192, 64))
    down = synthetic_value(spec, "model.layers.1.mlp.experts.down_proj", (4, 64, 96))
    assert torch.equal(gate_up[2, :96], synthetic_tensor("layers.1.experts.2.gate.weight",
                                                          (96, 64), cpu))
    assert torch.equal(gate_up[2, 96:], synthetic_tensor("layers.1.experts.2.up.weight",
                                                          (96, 64), cpu))
    assert torch.equal(down[3], synthetic_tensor("layers.1.experts.3.down.weight", (64, 96), cpu))


def test_gpu_reserve_covers_kv_cache() -> None:
    from bench.peers.accelerate_peer import SLACK, gpu_reserve
    from flexrun.models.dummy import dummy_spec
    spec = dummy_spec("mixtral-8x7b")
    r4, r16 = (gpu_reserve(spec, b, 512, 32, 2) for b in (4, 16))
    kv16 = spec.kv_bytes_per_token(2) * 16 * 544
    assert r16 > kv16 + SLACK and r4 < r16 < 4 << 30


def test_decode_skips_the_gather_that_does_not_fit() -> None:
    """transformers' decode switch to batched_mm gathers 352 MB of Mixtral weights per token
    and expert (it ran out of memory at batch 4 under 24 GiB): skipped there, kept for
    Qwen3-MoE's small experts, and an explicit choice stands."""
    from bench.peers.accelerate_peer import decode_experts, decode_gather_bytes
    from flexrun.models.dummy import dummy_spec
    mixtral, qwen = dummy_spec("mixtral-8x7b"), dummy_spec("qwen3-30b-a3b")
    assert decode_gather_bytes(mixtral, 4, 2) == 4 * 2 * 3 * 4096 * 14336 * 2
    assert decode_experts("auto", mixtral, 4, 512, 2) == "keep"
    assert decode_experts("auto", qwen, 8, 512, 2) == "switch"
    assert decode_experts("switch", mixtral, 4, 512, 2) == "switch"
