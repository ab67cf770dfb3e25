"""Hardware profiles: shipped ones matched to the GPU and host, else measured once and cached;
the profile CLI; the CPU rates a measurement fills."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from flexrun import FlexrunError
from flexrun.cli import main as cli_main
from flexrun.plan import hardware
from flexrun.plan.hardware import (PROFILES_DIR, HardwareProfile, default_profile, measure,
                                   profile_path)
from flexrun.plan.timing import cache_bytes, cpu_has_bf16

H100 = HardwareProfile.load(PROFILES_DIR / "h100.json")
CPU = HardwareProfile.load(PROFILES_DIR / "cpu-2core.json")
GiB = 1 << 30


def test_profiles_round_trip_and_defaults(tmp_path, monkeypatch):
    assert "DESIGN.md" in H100.source and H100.h2d_pinned == 55e9
    assert CPU.source == "measured" and CPU.command.startswith("flexrun profile")
    monkeypatch.delenv("FLEXRUN_PROFILE", raising=False)
    monkeypatch.setattr(hardware, "host_facts", lambda: (CPU.cpu_cores, CPU.cpu_mem))
    assert default_profile("cpu") == CPU
    assert default_profile("cuda") == HardwareProfile.load(profile_path("cuda"))
    if not torch.cuda.is_available():
        assert profile_path("cuda").name == "h100.json" and default_profile("cuda") == H100
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert HardwareProfile.load(profile_path("cuda")).device_name == "NVIDIA H200"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert profile_path("cuda").name == "h100.json"      # not h100-measured.json
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    assert profile_path("cuda").name == "h100.json"
    H100.save(tmp_path / "h.json")
    assert HardwareProfile.load(tmp_path / "h.json") == H100
    with pytest.raises(FlexrunError, match="not found"):
        HardwareProfile.load(tmp_path / "missing.json")


def test_profile_matches_gpu_and_host_else_is_measured_once(tmp_path, monkeypatch, capsys):
    """The shipped h200.json came from a 32-core, 270 GB host, h200-single.json from the
    16-core, 125 GiB single-H200 machine: each host gets its own; an H200 on another host
    (8 cores, 60 GiB) measures its own on first use (one line), keeps it in the user's cache
    (0600), with the fitted terms of the shipped profile, and loads it from there afterwards."""
    H200 = HardwareProfile.load(PROFILES_DIR / "h200.json")
    monkeypatch.delenv("FLEXRUN_PROFILE", raising=False)
    monkeypatch.setenv("FLEXRUN_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(hardware, "host_facts", lambda: (H200.cpu_cores, H200.cpu_mem))
    assert hardware.matching_profile("cuda") == PROFILES_DIR / "h200.json"
    monkeypatch.setattr(hardware, "host_facts", lambda: (16, 125 << 30))
    assert hardware.matching_profile("cuda") == PROFILES_DIR / "h200-single.json"
    monkeypatch.setattr(hardware, "host_facts", lambda: (8, 60 << 30))
    monkeypatch.setattr(hardware, "host_memory", lambda: 60 << 30)
    assert hardware.matching_profile("cuda") is None
    measured = []

    def fake_measure(kind, command=""):
        measured.append(kind)
        return HardwareProfile(device_name="NVIDIA H200", cpu_cores=8, cpu_mem=60 << 30,
                               h2d_pinned=50e9, gpu_flops_prefill=7e14, gpu_mem_bw=4e12)
    monkeypatch.setattr(hardware, "measure", fake_measure)
    first = default_profile("cuda")
    assert measured == ["cuda"] and "measuring one" in capsys.readouterr().err
    assert first.cpu_attn_call_s == H200.cpu_attn_call_s and "not measured here" in \
        first.notes["cpu_attn_call_s"]
    path = hardware.cache_path("cuda")
    assert path.parent == tmp_path / "profiles" and oct(path.stat().st_mode)[-3:] == "600"
    assert default_profile("cuda") == first and measured == ["cuda"]


def test_profile_cli_writes_json(tmp_path, monkeypatch, capsys):
    import functools
    import flexrun.plan.hardware as hw
    monkeypatch.setattr(hw, "measure", functools.partial(hw.measure, disk_bytes=32 << 20))
    out = tmp_path / "hw.json"
    assert cli_main(["profile", "-o", str(out), "--offload-dir", str(tmp_path),
                     "--device", "cpu"]) == 0
    p = HardwareProfile.load(out)
    assert p.command.startswith(f"flexrun profile -o {out}") and p.disk_read > 0
    assert "CPU GEMM" in capsys.readouterr().out
    monkeypatch.setenv("FLEXRUN_PROFILE", str(out))
    assert default_profile("cuda") == p


def test_measure_cpu_fills_every_cpu_rate(tmp_path):
    p = measure("cpu", str(tmp_path), disk_bytes=64 << 20)
    names = ["disk_read", "disk_write", "disk_read_cached", "disk_map_cached",
             "cpu_flops_decode", "cpu_flops_decode_small", "cpu_flops_prefill",
             "cpu_flops_decode_bf16", "cpu_flops_prefill_bf16", "cpu_mem_bw", "cpu_attn_bw",
             "cpu_unit_overhead"]
    if cpu_has_bf16():          # without bf16 dot products: one short bf16 shape only
        names.append("cpu_flops_decode_small_bf16")
    for name in names:
        assert getattr(p, name) > 0, name
    assert p.h2d_pinned is None and p.cpu_mem > 0 and not list(tmp_path.iterdir())
    assert p.notes["cpu_gemm_stream_bytes"] >= min(2 * cache_bytes(), p.cpu_mem // 8)


def test_cpu_gemm_time_between_the_two_decode_rates():
    """Fewer rows than cpu_decode_m are timed on the line through the rates at
    cpu_decode_m_small and cpu_decode_m rows; at or above cpu_decode_m, and for a profile
    without the small-row rate, the one-point model holds (its line to the prefill rate)."""
    p = dataclasses.replace(CPU, cpu_flops_decode=80e9, cpu_flops_prefill=320e9,
                            cpu_flops_decode_small=30e9, cpu_decode_m=16, cpu_decode_m_small=4)
    params = 10 ** 7
    assert p.gemm_time(4, params, False) == pytest.approx(2 * params * 4 / 30e9)
    assert p.gemm_time(16, params, False) == pytest.approx(2 * params * 16 / 80e9)
    mid = (2 * params * 4 / 30e9 + 2 * params * 16 / 80e9) / 2
    assert p.gemm_time(10, params, False) == pytest.approx(mid)
    one_point = dataclasses.replace(p, cpu_flops_decode_small=None)
    for rows in (16, 64, 512):
        assert p.gemm_time(rows, params, False) == one_point.gemm_time(rows, params, False)
    assert one_point.gemm_time(4, params, False) == pytest.approx(
        2 * params * (16 / 80e9 - 12 / 320e9))
    # a 2-byte run without bf16 rates uses the fp32 ones, the small-row rate included
    fp32_only = dataclasses.replace(p, cpu_flops_decode_bf16=None, cpu_flops_prefill_bf16=None)
    assert fp32_only.gemm_time(4, params, False, 2) == pytest.approx(2 * params * 4 / 30e9)
    assert H100.gemm_time(4, params, True) == H100.gemm_time(4, params, True, 4)   # GPU as before


def test_shipped_profile_without_a_fitted_term_takes_it_from_a_sibling(monkeypatch):
    """h100-measured.json (the 16-core H100 machine) predates cpu_attn_call_s: planned as 0,
    Qwen3-30B-A3B under 16 GiB got 2 x 128 (6,144 CPU-attention calls per step). The loaded
    profile takes the term from h100.json, the same GPU's, and says so."""
    monkeypatch.delenv("FLEXRUN_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(hardware, "host_facts", lambda: (16, 125 << 30))
    assert hardware.matching_profile("cuda") == PROFILES_DIR / "h100-measured.json"
    assert HardwareProfile.load(PROFILES_DIR / "h100-measured.json").cpu_attn_call_s is None
    prof = default_profile("cuda")
    assert prof.cpu_attn_call_s == H100.cpu_attn_call_s
    assert prof.notes["cpu_attn_call_s"].startswith("from h100.json")
    # a GPU no shipped profile names: a profile of a host like its own lends the term
    other = HardwareProfile(device_name="NVIDIA L40S", cpu_cores=16, cpu_mem=125 << 30,
                            h2d_pinned=25e9)
    assert hardware.fill_missing_terms(other).cpu_attn_call_s is not None
    assert other.gpu_graph_unit_overhead is None and other.gpu_expert_bw is None  # GPU terms
    cpu = hardware.fill_missing_terms(HardwareProfile(device_name="cpu", cpu_cores=16))
    assert cpu.cpu_attn_call_s is None


def test_graph_replay_cost_comes_from_the_same_gpus_profile():
    """A profile older than the graphed-unit benchmark (as h100-measured.json once was)
    priced every unit of a resident decode as an eager launch (0.45 ms): OPT-1.3B's step at
    11.7 ms where the H100 ran it in about 4 ms. Such a profile takes h100.json's measured
    replay cost (same GPU), never another GPU's, and the resident prediction drops."""
    from flexrun.models.loader import open_checkpoint
    from flexrun.plan.hardware import fill_missing_terms
    from flexrun.plan.search import search
    own = PROFILES_DIR / "h100-measured.json"
    bare = dataclasses.replace(HardwareProfile.load(own), gpu_graph_unit_overhead=None,
                               gpu_expert_bw=None, notes={})
    prof = fill_missing_terms(dataclasses.replace(bare, notes={}), own=own)
    assert prof.gpu_graph_unit_overhead == H100.gpu_graph_unit_overhead
    assert prof.notes["gpu_graph_unit_overhead"] == "from h100.json (not measured here)"
    assert prof.gpu_expert_bw is None          # h100.json lacks it: not the H200's
    spec = open_checkpoint("dummy:opt-1.3b").spec
    step = [search(spec, p, 128, 32, 70 << 30, 100 << 30, None, "cuda", 2,
                   num_prompts=128).prediction.decode_s for p in (bare, prof)]
    assert step[1] < step[0] / 2
