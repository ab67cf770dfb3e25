"""The DeepSpeed ZeRO-Inference and AirLLM peers' CPU-side parts: configs, batch estimates,
result lines, the checkpoint writer, the headline table and bench.run's scenarios. Runs that
need deepspeed / airllm skip where they are not installed (they never are in CI) and also
need FLEXRUN_PEER_E2E=1 (DeepSpeed's first CPU start builds an op, ~40 s; AirLLM's run ~12 s)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch

from bench import headline
from bench.peers import airllm_peer as ap
from bench.peers import deepspeed_peer as dp
from flexrun.models.dummy import dummy_spec, synthetic_tensor
from flexrun.models.loader import canonical_name
from flexrun.models.spec import ModelSpec


def tiny_opt() -> ModelSpec:
    return ModelSpec(arch="opt", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=4, head_dim=16, ffn_dim=256, max_positions=128,
                     bos_token_id=2, eos_token_ids=[2], pad_token_id=1, name="dummy:tiny-opt")


def tiny_llama() -> ModelSpec:
    return ModelSpec(arch="llama", vocab_size=512, hidden_size=64, num_layers=3, num_heads=4,
                     num_kv_heads=2, head_dim=16, ffn_dim=128, max_positions=256,
                     norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_ids=[2], name="dummy:tiny-llama")


def test_ds_config_is_zero_inference():
    cfg = dp.ds_config(7168, 17)
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert z["stage3_max_live_parameters"] == z["stage3_prefetch_bucket_size"] == 2 * 7168**2
    assert z["stage3_param_persistence_threshold"] == 7168
    assert cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"]
    assert cfg["train_batch_size"] == 17 and "weight_quantization" not in cfg
    assert not dp.ds_config(64, 1, pin_memory=False)["zero_optimization"]["offload_param"][
        "pin_memory"]


def test_ds_config_4bit_is_quantized_initialization():
    q = dp.ds_config(4096, 8, quant_bits=4)["weight_quantization"]
    assert q == {"quantized_initialization": {"num_bits": 4, "group_size": 64, "group_dim": 1,
                                              "symmetric": False}}
    with pytest.raises(ValueError):
        dp.ds_config(64, 1, quant_bits=3)


def test_kv_batch_fits_the_budget():
    spec = dummy_spec("opt-30b")
    b = dp.kv_batch(spec, 16 << 30, 512, 32)
    assert 16 <= b <= 19                     # the issue's ~16-19 prompts for S1
    assert dp.kv_batch(spec, 32 << 30, 512, 32) > b
    assert dp.kv_batch(spec, 1 << 30, 512, 32) == 0
    assert spec.kv_bytes_per_token(2) * 544 * b < 16 << 30


def _main_line(mod, tag: str, monkeypatch, capsys, argv: list[str], run) -> tuple[dict, int]:
    monkeypatch.setattr(sys, "argv", ["x", *argv])
    monkeypatch.setattr(mod, "run", run)
    rc = 0
    try:
        mod.main()
    except SystemExit as e:
        rc = e.code
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(tag + " ")]
    assert len(line) == 1
    return json.loads(line[0][len(tag) + 1:]), rc


def test_result_lines(monkeypatch, capsys):
    def boom(a):
        a.ds_config = dp.ds_config(64, 1)
        raise RuntimeError("CUDA out of memory")
    r, rc = _main_line(dp, "DEEPSPEED_RESULT", monkeypatch, capsys, ["--model", "opt-30b"], boom)
    assert rc == 1 and "CUDA out of memory" in r["error"]
    assert set(r["left_out"]) == {"nvme_offload", "kv_offload"}
    assert r["ds_config"]["zero_optimization"]["stage"] == 3
    assert r["args"]["batch_size"] == "auto" and r["args"]["pin_memory"] is True
    r, rc = _main_line(dp, "DEEPSPEED_RESULT", monkeypatch, capsys,
                       ["--model", "opt-30b", "--quant-bits", "4"], lambda a: {"total_tok_s": 1})
    assert rc == 0 and r == {"total_tok_s": 1}
    r, rc = _main_line(ap, "AIRLLM_RESULT", monkeypatch, capsys, ["--model", "llama3-8b"],
                       lambda a: 1 / 0)
    assert rc == 1 and r["error"].startswith("ZeroDivisionError") and r["args"]["gpu_mem"]


def test_airllm_batch_and_candidates():
    b = ap.airllm_batch(dummy_spec("llama3-8b"), 4 << 30, 512, 32)
    assert 12 <= b <= 28
    assert ap.airllm_batch(dummy_spec("llama-13b"), 4 << 30, 512, 32) < b
    assert ap.candidates("auto", 20) == [20, 15, 10, 5, 1]
    assert ap.candidates("8,24,16", 99) == [24, 16, 8]
    assert ap.module_of("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert ap.module_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert ap.module_of("lm_head.weight") == "lm_head"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    return ap.write_checkpoint(tiny_llama(), out), out


def test_checkpoint_is_flexruns_weights(tiny_ckpt):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    info, out = tiny_ckpt
    assert info["written"] and info["shards"] == 3 + 3        # embed, 3 layers, norm, head
    assert not ap.write_checkpoint(tiny_llama(), out)["written"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in set(index.values()):                           # one module per shard
        with safe_open(str(out / shard), "pt") as f:
            assert len({ap.module_of(k) for k in f.keys()}) == 1
    spec = tiny_llama()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    assert model.dtype == torch.float16
    for k, v in model.state_dict().items():
        name = canonical_name(spec, k)
        want = synthetic_tensor(name, tuple(v.shape), torch.device("cpu"))
        assert torch.equal(v, want), k


def _greedy_hf(out, ids, new: int = 4):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.tensor(ids)
    r = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                       do_sample=False, pad_token_id=2)
    return r[:, x.shape[1]:].tolist()


def test_flexrun_reads_the_checkpoint(tiny_ckpt):
    from flexrun import LLM, SamplingParams
    _, out = tiny_ckpt
    ids = torch.randint(10, 500, (2, 12), generator=torch.Generator().manual_seed(0)).tolist()
    with LLM(str(out), device="cpu", dtype="float32") as llm:
        got = [o.output_ids for o in llm.generate(ids, 4, SamplingParams(ignore_eos=True))]
    assert got == _greedy_hf(out, ids)


@pytest.mark.skipif(os.environ.get("FLEXRUN_PEER_E2E") != "1", reason="set FLEXRUN_PEER_E2E=1")
def test_airllm_runs_the_checkpoint_on_cpu(tiny_ckpt, monkeypatch):
    pytest.importorskip("airllm")
    _, out = tiny_ckpt
    monkeypatch.setattr(ap, "dummy_spec", lambda name: tiny_llama())
    monkeypatch.setattr(ap, "drop_page_cache", lambda: "kept (test)")
    a = ap.parser().parse_args(["--model", "tiny-llama", "--checkpoint", str(out), "--device",
                                "cpu", "--prompt-len", "12", "--gen-len", "5",
                                "--batch-size", "2"])
    r = ap.run(a)
    assert r["split"] == "linked" and r["batch_size"] == 2 and not r["extrapolated"]
    assert r["total_tok_s"] > 0 and r["page_cache"] == "kept (test)"
    ids = torch.randint(10, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    assert r["first_tokens"] == _greedy_hf(out, ids.tolist(), 5)[0]     # the peer's prompts


@pytest.mark.skipif(os.environ.get("FLEXRUN_PEER_E2E") != "1", reason="set FLEXRUN_PEER_E2E=1")
@pytest.mark.parametrize("bits", [16, 4])
def test_deepspeed_zero3_on_cpu_matches_transformers(bits):
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from bench.peers.hf_shapes import hf_config
    spec = tiny_opt()
    dtype = torch.float32 if bits == 16 else torch.float16
    cfg = dp.ds_config(64, 2, pin_memory=False, quant_bits=bits,
                       dtype="float32" if bits == 16 else "float16")
    model, _keep, info = dp.build(argparse.Namespace(torch_dequant=True), spec, cfg, dtype,
                                  device="cpu")
    assert info["tensors_written"] == 36
    if bits == 4:
        assert getattr(model.model.decoder.layers[0].fc1.weight, "weight_quantized", False)
    unset_hf_deepspeed_config()
    ref = AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.float32)
    shapes = spec.all_shapes()
    sd = {k: synthetic_tensor(n, tuple(shapes[n]), torch.device("cpu"), torch.float32)
          for k in ref.state_dict()
          for n in [canonical_name(spec, k) if k != "lm_head.weight" else "embed.tokens"]}
    ref.load_state_dict(sd)
    x = torch.randint(10, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=x).logits.float(), ref.eval()(input_ids=x).logits
    tol = 1e-5 if bits == 16 else 0.25 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tol


def test_headline_arithmetic_and_table(tmp_path):
    assert "does not fit" in headline.does_not_fit("opt-175b", compressed=False)
    assert headline.does_not_fit("opt-175b", compressed=True) is None
    assert headline.does_not_fit("opt-30b", compressed=False) is None
    assert 95e9 < headline.weight_bytes("opt-175b", 4) < 100e9
    (tmp_path / "H-opt-30b-GPU.json").write_text(json.dumps({
        "deepspeed": {"total_tok_s": 3.5, "batch_size": 17, "extrapolated": True},
        "accelerate": {"total_tok_s": 1.0}, "flexgen": {"error": "timed out after 540 s"}}))
    (tmp_path / "S1-GPU.json").write_text(json.dumps({"flexrun-auto": {"total_tok_s": 40.0},
                                                     "flexgen": {"total_tok_s": 15.0}}))
    t = headline.table(tmp_path, "GPU")
    row = {ln.split(" | ")[0].strip("| "): ln.split(" | ") for ln in t.splitlines()[2:]}
    assert row["DeepSpeed ZeRO-Inference"][3] == "3.50 (batch 17, decode extrapolated)"
    assert row["HF Accelerate"][3] == "1.00"
    assert row["FlexGen"][3].startswith("failed: flexgen: timed out")
    assert row["Petals"][1].startswith("not run")
    assert "does not fit" in row["flexrun"][5] and row["flexrun (c)"][5] == "not run yet"
    assert row["flexrun"][3] == "40.00 (from S1)"            # S1's run stands for H-opt-30b
    # a second device fills the first's gaps and failures, marked; never its results
    (tmp_path / "H-opt-175b-GPU2.json").write_text(json.dumps({
        "flexrun-compressed": {"total_tok_s": 9.0, "batch_size": 24}}))
    (tmp_path / "H-opt-30b-GPU2.json").write_text(json.dumps({
        "flexgen": {"total_tok_s": 12.0}, "accelerate": {"total_tok_s": 2.0}}))
    t = headline.table(tmp_path, "GPU,GPU2")
    row = {ln.split(" | ")[0].strip("| "): ln.split(" | ") for ln in t.splitlines()[2:]}
    assert row["flexrun (c)"][5] == "9.00 (batch 24, on GPU2)"
    assert row["FlexGen"][3] == "12.00 (on GPU2)" and row["HF Accelerate"][3] == "1.00"


def test_scenarios_name_known_systems():
    from bench import run
    meta = {"what", "floor", "prompt_len", "gen_len", "prepare", "drop_caches"}
    for name, sc in run.SCENARIOS.items():
        assert set(sc) - meta <= set(run.SYSTEMS), name
    assert {"deepspeed", "deepspeed-compressed"} <= set(run.SCENARIOS["S1"])
    for name in ("S8-airllm", "S8-airllm-13b"):
        sc = run.SCENARIOS[name]
        assert {"flexrun", "airllm"} <= set(sc) and sc["drop_caches"]
        assert sc["flexrun"][1].endswith(sc["prepare"][sc["prepare"].index("--model") + 1])
    for m in headline.MODELS:
        assert f"H-{m}" in run.SCENARIOS


def test_deepspeed_gets_an_arch_list_it_can_parse():
    """The GPU image's TORCH_CUDA_ARCH_LIST=9.0a stopped DeepSpeed's 4-bit kernel build
    (int('0a')); the peer passes it on without the arch-specific suffixes."""
    from bench.peers.deepspeed_peer import plain_arch_list
    assert plain_arch_list("9.0a") == "9.0"
    assert plain_arch_list("8.0;9.0a;9.0") == "8.0 9.0"
    assert plain_arch_list("9.0+PTX") == "9.0+PTX"
    assert plain_arch_list("9.0a+PTX") == "9.0+PTX"
    assert plain_arch_list(None) is None


def test_oom_kill_lines_after_the_start_are_the_error():
    """A peer killed by the kernel's OOM killer (rc -9, no output) gets the kill line of its
    run, not an earlier one, as its error text."""
    from bench.system_proc import oom_kills
    log = ("[  100.5] Out of memory: Killed process 11 (python3) anon-rss:1kB\n"
           "[  430.0] Out of memory: Killed process 809 (python3) total-vm:50kB, "
           "shmem-rss:127520256kB\n"
           "[  431.0] something else\n")
    got = oom_kills(400.0, log)
    assert got["error"].startswith("killed by the kernel's out-of-memory killer")
    assert got["oom_kill"] == [log.splitlines()[1].strip()]
    assert oom_kills(500.0, log) == {}
