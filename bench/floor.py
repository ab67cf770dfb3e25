"""The decode-step floor of a run: the bytes each link must carry per step over its measured
bandwidth, or the step's matmul work at peak rate, whichever is largest.

Bandwidths come from the hardware profile (policies/profiles/h100.json on the H100). Bytes
per step, for the block (gpu_batch_size x num_gpu_batches prompts) at the average key count
P + gen/2, with the placement fractions of the policy:
  pcie      weights stored on CPU or disk, the KV prefix of host-resident layers when the GPU
            attends, plus the offloaded activations (both ways; tiny in decode)
  host_dram weights the DMA reads from host memory plus the KV that CPU attention reads there
            (a CPU run: all its weights and KV), at the profile's read rate (memcpy without);
            when CPU attention and the copies both read DRAM (a GPU run with host KV), at
            most at the rate both reach together (h2d_pinned + cpu_attn_bw_with_h2d, the
            attention's rate beside the copies), and the KV alone at cpu_attn_bw
  disk      weights and KV stored on disk (at the page-cache rate when they fit in RAM; a
            CPU run maps its disk weights from the page cache, at the mapping rate)
  hbm       weights read on the GPU (the 4-bit codes when compressed) plus GPU-resident KV
  compute   2 x GEMM parameters x rows at the profile's prefill (peak) GEMM rate (CUDA; on
            the CPU fp32, or bf16 where the profile has bf16 rates)
A mixture-of-experts model moves only the experts its block's tokens touch (plan/moe_cost.py)
and multiplies k of them per token; with the CPU lane (expert_lanes auto/cpu) its off-device
weights are served by the copy and the CPU expert GEMMs together (h2d + cpu_expert_bw over
the number of the block's batches that read each expert again, as plan/unit_terms.py says).
"""
from __future__ import annotations

from flexrun.config import Policy
from flexrun.plan.costmodel import reads_page_cache
from flexrun.plan.footprint import kv_block_nbytes
from flexrun.plan.footprint import numel, weight_bytes
from flexrun.plan.hardware import HardwareProfile
from flexrun.plan.moe_cost import cpu_lane_bps, moe_layer
from flexrun.models.spec import ModelSpec


def decode_floor(spec: ModelSpec, policy: Policy, prof: HardwareProfile, prompt_len: int,
                 gen_len: int, cuda: bool = True, elem: int | None = None) -> dict:
    """{'floor_s', 'bound', and seconds per link} for one decode step of the block; elem:
    bytes per value (default 2 on CUDA, 4 on the CPU); 2 on the CPU means bf16, whose compute
    term needs the profile's bf16 rates (left out without them)."""
    elem = elem or (2 if cuda else 4)
    rows = policy.block_size
    weights = sum(weight_bytes(n, s, elem, policy) for n, s in spec.all_shapes().items())
    wg, wc, wd = (x / 100 for x in policy.weights_split())
    cg, cc, cd = (x / 100 for x in policy.cache_split())
    ag = policy.act_split()[0] / 100
    # the KV cache as stored (compressed: codes, mins and scales, the exact window and sinks)
    kv = spec.num_layers * kv_block_nbytes(spec, policy, elem, prompt_len + gen_len / 2)
    act = 2 * (spec.num_units - 1) * rows * spec.hidden_size * elem * (1 - ag)
    host_kv = kv * (cc + cd)
    host_attn = not cuda or policy.cpu_attention
    # GEMM weights: the position table and an untied token table are lookups
    gathered = ["embed.positions"] + ([] if spec.tie_word_embeddings else ["embed.tokens"])
    gemm_params = sum(numel(s) for n, s in spec.all_shapes().items() if n not in gathered)
    # host bytes are only read (by the DMA or CPU compute): the profile's read rate, where it
    # has one, else its memcpy rate (which moves each byte twice)
    read = prof.cpu_read_bw or prof.cpu_mem_bw
    moe = moe_layer(spec, policy, elem)
    off_rate = prof.h2d_pinned if cuda else None
    if moe is not None:     # only touched experts move; each token multiplies k of them
        moved = moe.moved_share(rows)
        layers = spec.num_layers * moe.share
        expert_bytes = layers * moe.experts * moe.expert_bytes
        weights -= expert_bytes * (1 - moved)
        gemm_params -= int(layers * (moe.experts - moe.top_k) * moe.expert_params)
        cpu_lane = cpu_lane_bps(policy, prof, cuda)
        if cpu_lane:    # copy and CPU lanes; a CPU-lane expert is read again by each batch
            uses = moe.uses(policy.gpu_batch_size, policy.num_gpu_batches)
            off_rate = prof.h2d_pinned + cpu_lane / uses
    t = {}
    if cuda or elem == 4 or (prof.cpu_flops_decode_bf16 and prof.cpu_flops_prefill_bf16):
        t["compute"] = 2 * gemm_params * rows / (prof.gpu_flops_prefill if cuda
                                                 else prof.cpu_rates(elem)[1])
    if cuda:
        t["pcie"] = weights * (wc + wd) / off_rate + \
            ((0 if host_attn else host_kv) + act) / prof.h2d_pinned
        t["hbm"] = (weights + kv * cg + (0 if host_attn else host_kv)) / prof.gpu_mem_bw
        t["host_dram"] = (weights * (wc + wd) + (host_kv if host_attn else 0)) / read
        if host_attn and host_kv and prof.cpu_attn_bw and prof.cpu_attn_bw_with_h2d:
            both = prof.h2d_pinned + prof.cpu_attn_bw_with_h2d
            t["host_dram"] = max(host_kv / prof.cpu_attn_bw,
                                 (weights * (wc + wd) + host_kv) / both)
    else:
        t["host_dram"] = (weights + kv) / read
    if wd or cd:        # read back from the page cache when it fits (as the cost model says)
        from flexrun.plan.footprint import footprint
        fp = footprint(spec, policy, elem, prompt_len, gen_len, cuda=cuda)
        cached = reads_page_cache(prof, fp, cuda)
        read = prof.disk_read_cached if cached else prof.disk_read
        mapped = (prof.disk_map_cached if cached and not cuda else None) or read
        t["disk"] = weights * wd / mapped + kv * cd / read
    bound = max(t, key=t.get)
    return {"floor_s": t[bound], "bound": bound, **{f"{k}_s": v for k, v in t.items()}}


def prefill_floor(spec: ModelSpec, prompts: int, prompt_len: int, prof: HardwareProfile,
                  cuda: bool = True, elem: int = 2) -> float:
    """Seconds of the prefill's matmul work at the profile's peak (prefill) GEMM rate: every
    layer's GEMMs over every prompt token, causal attention (half the score matrix), and
    the head over each prompt's last token. A routed expert's weights count for the share
    of tokens routed to it (top-k of E)."""
    routed = spec.experts_per_token / spec.num_experts if spec.num_experts else 1.0
    layer = sum(numel(sh) * (routed if ".experts." in n else 1.0)
                for n, sh in spec.unit_shapes(1).items() if len(sh) == 2)
    head = spec.vocab_size * spec.embed_dim
    q_dim = spec.num_heads * spec.head_dim
    tokens = prompts * prompt_len
    flops = (2 * layer * spec.num_layers * tokens + 2 * head * prompts
             + 2 * spec.num_layers * prompts * prompt_len ** 2 * q_dim)
    rate = prof.gpu_flops_prefill if cuda else prof.cpu_rates(elem)[1]
    return flops / rate


def floor_of_result(r: dict) -> dict | None:
    """The floor of one bench.run_flexrun result (a `dummy:` model), from the shipped profile
    of its device kind; None for other models, {"error": ...} when inputs are missing."""
    if not str(r.get("model", "")).startswith("dummy:") or "policy" not in r:
        return None
    try:
        return _floor_of_result(r)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:   # incomplete inputs
        return {"error": f"{type(e).__name__}: {e}"}


def _floor_of_result(r: dict) -> dict:
    from flexrun.plan.hardware import HardwareProfile, PROFILES_DIR, default_profile, \
        profile_source
    from flexrun.models.dummy import dummy_spec
    cuda = r.get("device", "cpu") != "cpu"
    named = r.get("profile")            # the profile the run predicted with, where it says
    shipped = PROFILES_DIR.parents[1] / named if named else None
    if shipped is not None and not shipped.is_file():
        shipped = None
    prof = (HardwareProfile.load(shipped) if shipped is not None
            else default_profile("cuda" if cuda else "cpu"))
    spec = dummy_spec(r["model"][len("dummy:"):])
    elem = ({"float32": 4}.get(r.get("dtype"), 2) if r.get("dtype") else None) or \
        (2 if cuda else 4)
    f = decode_floor(spec, Policy.from_dict(r["policy"]), prof, r["prompt_len"], r["gen_len"],
                     cuda, elem)
    f["profile"] = named if shipped is not None else profile_source("cuda" if cuda else "cpu")
    if "decode_step_s" in r:
        f["measured_over_floor"] = r["decode_step_s"] / f["floor_s"]
    n = r.get("num_prompts")
    if n and "total_tok_s" in r:
        # the run's tok/s against the same run at the floors: prefill at the peak GEMM rate
        # plus gen - 1 floor steps (the first token comes with the prefill)
        pre = prefill_floor(spec, n, r["prompt_len"], prof, cuda, elem)
        best = n * r["gen_len"] / (pre + (r["gen_len"] - 1) * f["floor_s"])
        f.update(prefill_floor_s=pre, floor_total_tok_s=best,
                 share_of_floor_tok_s=r["total_tok_s"] / best)
    return f
