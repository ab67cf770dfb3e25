"""Measuring a machine for the cost model (`flexrun profile`, and a profile's first use):
CPU GEMM / attention / memcpy / read rates, disk, the process's own baseline and, with CUDA,
the GPU and the PCIe link, into a HardwareProfile (plan/hardware.py builds it and chooses
among profiles). The rates come from plan/timing.py."""
from __future__ import annotations

import os
import shutil
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flexrun.config import FlexrunError
from flexrun.engine.budget import cuda_context_bytes, rss_anon
from flexrun.plan.timing import (attn_bw, attn_bw_with_h2d, cache_bytes, copy_bw, cpu_has_bf16,
                                 decode_rates, disk_rates, dram_shapes, expert_bw, gemm_rates,
                                 grouped_expert_bw, h2d_call_cost, prefill_rate, qattn_bw, read_bw,
                                 unit_overhead, w4_expert_call, w4_rates)

if TYPE_CHECKING:
    from flexrun.plan.hardware import HardwareProfile


def fill(prof: HardwareProfile, kind: str, offload_dir: str, disk_bytes: int) -> None:
    """Time this machine into `prof`: CPU GEMM / attention / memcpy / read rates, disk, the
    process's baseline and (kind "cuda") the GPU and the PCIe link."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise FlexrunError("--device cuda asked for but no CUDA GPU is visible: use --device cpu")
    if not os.path.isdir(offload_dir):
        raise FlexrunError(f"offload directory {offload_dir} does not exist")
    cpu = torch.device("cpu")
    nosync = lambda: None  # noqa: E731
    if kind == "cuda":          # the CUDA runtime's host memory is part of the baseline
        torch.zeros(1, device="cuda")
    prof.cpu_baseline = rss_anon() or None
    prof.device_name = _cpu_name()
    # decode-row GEMMs stream their weights from memory, as a decode step does: distinct
    # copies of each weight, twice the last-level cache in all (timing.decode_rates)
    stream = min(2 * cache_bytes(), prof.cpu_mem // 8)
    # bf16 at one shape each where the CPU lacks bf16 dot products (slow there: keep it short)
    few = not cpu_has_bf16()
    for dtype, names in ((torch.float32, ("cpu_flops_decode", "cpu_flops_decode_small",
                                          "cpu_flops_prefill")),
                         (torch.bfloat16, ("cpu_flops_decode_bf16", "cpu_flops_decode_small_bf16",
                                           "cpu_flops_prefill_bf16"))):
        short = few and dtype == torch.bfloat16
        rates = decode_rates(cpu, dtype, (prof.cpu_decode_m,) if short else
                             (prof.cpu_decode_m, prof.cpu_decode_m_small),
                             (4096,) if short else (3072, 4096, 5120), nosync,
                             0 if short else stream)
        if short:
            rates.append(None)
        rates.append(prefill_rate(cpu, dtype, ((256, 1024),) if short else
                                  ((256, 1024), (512, 1536), (512, 2048)), nosync))
        for name, rate in zip(names, rates):
            setattr(prof, name, rate)
    # CPU attention runs on the run's dtype: fp16 KV for a CUDA run, fp32 on a CPU run
    # a run's KV cache and weights are read from DRAM: each sample's data is larger than
    # the last-level cache (stream), or the rates are the cache's
    attn_dtype = torch.float16 if kind == "cuda" else torch.float32
    attn_shapes = dram_shapes(((4, 12, 1024, 64), (8, 16, 512, 64), (8, 32, 256, 128)),
                              stream, attn_dtype.itemsize)
    prof.cpu_attn_bw = attn_bw(cpu, attn_dtype, nosync, attn_shapes)
    prof.cpu_qattn_bw = qattn_bw(cpu, attn_dtype, min(stream, 256 << 20))
    prof.cpu_unit_overhead = unit_overhead(cpu, torch.float32, nosync)
    a = torch.empty(64 << 20, dtype=torch.float32)
    prof.cpu_mem_bw = copy_bw(a.normal_(), torch.empty_like(a), nosync)
    del a
    prof.cpu_read_bw = read_bw(nosync, stream)
    for name, value in disk_rates(offload_dir, disk_bytes).items():
        setattr(prof, name, value)
    prof.disk_mem = shutil.disk_usage(offload_dir).free
    prof.notes = {"disk_dir": offload_dir, "disk_file_bytes": disk_bytes,
                  "cpu_dtype": "float32", "cpu_attn_dtype": str(attn_dtype),
                  "torch_threads": torch.get_num_threads(), "cpu_gemm_stream_bytes": stream,
                  "cpu_attn_shapes": [list(x) for x in attn_shapes]}
    if kind == "cuda":
        prof.cpu_expert_bw = expert_bw(torch.float16)
        _measure_cuda(prof)


def _measure_cuda(prof: HardwareProfile) -> None:
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    prof.device_name = torch.cuda.get_device_name(dev)
    prof.gpu_mem = torch.cuda.get_device_properties(dev).total_memory
    # other processes on a shared GPU show up there too: a context is well under 2 GiB
    prof.gpu_context = min(cuda_context_bytes(dev), 2 << 30)
    h2d, d2h, h2d_pg, d2h_pg = [], [], [], []
    for mb in (256, 512, 1024):
        n = (mb << 20) // 2
        g = torch.empty(n, dtype=torch.float16, device=dev)
        pin = torch.empty(n, dtype=torch.float16, pin_memory=True)
        pg = torch.empty(n, dtype=torch.float16)
        h2d.append(copy_bw(pin, g, sync))
        d2h.append(copy_bw(g, pin, sync))
        h2d_pg.append(copy_bw(pg, g, sync))
        d2h_pg.append(copy_bw(g, pg, sync))
        del g, pin, pg
    med = statistics.median
    prof.h2d_pinned, prof.d2h_pinned = med(h2d), med(d2h)
    prof.h2d_pageable, prof.d2h_pageable = med(h2d_pg), med(d2h_pg)
    prof.h2d_call_s = h2d_call_cost(dev, sync)
    x = torch.empty(512 << 20, dtype=torch.float16, device=dev)
    # copy bandwidth counts both the read and the write (HBM traffic)
    prof.gpu_mem_bw = 2 * copy_bw(x, torch.empty_like(x), sync)
    del x
    prof.gpu_flops_decode, prof.gpu_flops_prefill = gemm_rates(
        dev, torch.float16, prof.gpu_decode_m, (4096, 7168, 8192),
        ((4096, 4096), (8192, 8192), (4096, 12288)), sync)
    prof.gpu_attn_bw = attn_bw(dev, torch.float16, sync,
                                ((32, 32, 1024, 128), (64, 56, 544, 128), (16, 96, 2048, 128)))
    prof.gpu_qattn_bw = qattn_bw(dev, torch.float16, 1 << 30, sync)
    prof.gpu_unit_overhead = unit_overhead(dev, torch.float16, sync)
    prof.gpu_graph_unit_overhead = unit_overhead(dev, torch.float16, sync, graph=True)
    big = dram_shapes(((8, 32, 512, 128),), prof.notes["cpu_gemm_stream_bytes"], 2)[0]
    prof.cpu_attn_bw_with_h2d = attn_bw_with_h2d(dev, prof.cpu_attn_bw, big)
    prof.gpu_w4_bw, prof.gpu_w4_flops = w4_rates(dev) or (None, None)
    prof.gpu_expert_bw = grouped_expert_bw(dev, sync)
    prof.gpu_w4_expert_call_s = w4_expert_call(dev)
    prof.notes["gpu_dtype"] = "float16"
    torch.cuda.empty_cache()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"
