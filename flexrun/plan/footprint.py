"""Peak memory of a policy per tier (bytes), and the budget check done before loading."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from flexrun.config import STORES_IN_FLIGHT, FlexrunError, Policy, format_size
from flexrun.models.moe import plain_experts
from flexrun.models.spec import ModelSpec
from flexrun.memory.quant import compressed_nbytes, kv_groups, kv_ring_len, kv_slot_nbytes
from flexrun.memory.storage import TIERS, assign_tiers
from flexrun.memory.wquant import LOAD_CHUNK


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def is_compressible(name: str, shape) -> bool:
    """Linear-layer weights are compressed (MoE experts each on their own); embeddings, norms,
    biases and the MoE gates (router, shared-expert gate: they pick and weigh the experts;
    llama.cpp keeps them F32 too) stay dense."""
    if name.endswith((".router.weight", ".shared_gate.weight")):
        return False
    return (name.startswith("layers.") and name.endswith(".weight") and len(shape) == 2) \
        or name in ("head.lm_head", "head.project_out")


def weight_bytes(name: str, shape, elem: int, policy: Policy) -> int:
    """Stored bytes of one weight (4-bit packed + fp16 min/scale per group when compressed)."""
    if policy.compress_weight and is_compressible(name, shape):
        groups = numel(shape[:-1]) * -(-shape[-1] // policy.quant_group)
        packed = groups * policy.quant_group * policy.quant_bits // 8
        return packed + 4 * groups
    return numel(shape) * elem


@dataclass
class Footprint:
    """Peak bytes per tier: 'gpu' (compute device), 'cpu' (host) and 'disk'."""
    weights: dict
    cache: dict
    buffers: int        # double-buffered weights + activations + workspace on the device
    host: int           # host-side staging (pinned reads, CPU attention workspace)
    load: int = 0       # the load's device transient beside the device's weights (4-bit)

    def total(self, tier: str) -> int:
        extra = self.buffers if tier == "gpu" else self.host if tier == "cpu" else 0
        run = self.weights[tier] + self.cache[tier] + extra
        return max(run, self.weights["gpu"] + self.load) if tier == "gpu" else run


def unit_set_shapes(spec: ModelSpec, units: range | None) -> dict[str, tuple[int, ...]]:
    """Weight name -> shape of the units (all by default), a shared tensor once."""
    if units is None:
        return spec.all_shapes()
    out: dict[str, tuple[int, ...]] = {}
    for u in units:
        out.update(spec.unit_shapes(u))
    return out


def streams_whole_units(policy: Policy, cuda: bool, units: range, num_units: int) -> bool:
    """Whether streamed weights are whole units (layers) rather than a share of every unit:
    on a GPU whose KV cache is all dense on the device, a unit with every weight resident
    replays its decode step from a CUDA graph (engine/graphs), and a streamed unit's copy
    overlaps the compute of all the resident units before it (Pipeline._start_next). Not
    for a pipeline stage (its loads look one unit ahead) or with offloaded activations
    (their copies back must not queue behind a later unit's weights)."""
    return (cuda and policy.cuda_graphs and policy.cache_gpu >= 100
            and not policy.compress_cache and policy.act_gpu >= 100
            and len(units) == num_units and 0 < policy.weights_gpu
            and policy.weights_cpu + policy.weights_disk > 0)


def weight_tiers(spec: ModelSpec, policy: Policy, names: list[str], sizes: list[int],
                 units: range, cuda: bool, hot: list[list[int]] | None = None,
                 groups: "ExpertGroups | None" = None) -> list[int]:
    """Tier index (0 gpu, 1 cpu, 2 disk) of each weight, bytes per tier per the policy.

    By default every unit gets its share of each tier (storage.assign_tiers). With whole
    units (streams_whole_units), units are kept resident, spread evenly and never above the
    policy's GPU bytes; the GPU bytes left over go to whole tensors of the streamed units
    that fit in them, the rest to the cpu and disk tiers in the policy's proportion."""
    split = policy.weights_split()
    if spec.num_experts:
        return moe_tiers(names, sizes, split, hot, groups)
    if not streams_whole_units(policy, cuda, units, spec.num_units):
        return assign_tiers(sizes, split)
    unit_of, size_of = {}, dict(zip(names, sizes))
    for u in units:
        for n in spec.unit_shapes(u):
            unit_of.setdefault(n, u)
    unit_bytes: dict[int, int] = {}
    for n in names:
        unit_bytes[unit_of[n]] = unit_bytes.get(unit_of[n], 0) + size_of[n]
    total, p = sum(sizes), split[0] / 100.0
    budget = p * total
    resident, kept, seen = set(), 0, 0
    for u, ub in unit_bytes.items():        # error diffusion over units, capped at the budget
        streamed = seen - kept
        seen += ub
        if kept + ub <= budget and p * seen - kept >= (1 - p) * seen - streamed:
            resident.add(u)
            kept += ub
    rest = [i for i, n in enumerate(names) if unit_of[n] not in resident]
    gpu_left = 100.0 * (budget - kept) / max(total - kept, 1)
    off = split[1] + split[2]
    sub = (gpu_left,) + tuple((100.0 - gpu_left) * x / off for x in split[1:])
    out = [0] * len(names)
    for i, t in zip(rest, assign_tiers([sizes[i] for i in rest], sub)):
        if t == 0 and kept + sizes[i] > budget:     # never above the GPU share
            t = 1 if split[1] >= split[2] else 2
        kept += sizes[i] if t == 0 else 0
        out[i] = t
    return out


@functools.lru_cache(maxsize=1 << 16)
def expert_of(name: str) -> str | None:
    """"layers.{j}.experts.{e}" of an expert's weight name, else None."""
    parts = name.split(".")
    return ".".join(parts[:4]) if len(parts) > 4 and parts[2] == "experts" else None


@dataclass
class ExpertGroups:
    """A MoE model's weights grouped as moe_tiers places them (computed once per layout)."""
    dense: list[int]            # indices of the weights outside experts
    dense_bytes: int
    keys: list[str]             # "layers.{j}.experts.{e}", one per expert
    members: list[list[int]]    # each expert's weight indices
    member_bytes: list[int]

    @classmethod
    def of(cls, names: list[str], sizes: list[int]) -> "ExpertGroups":
        expert = [expert_of(n) for n in names]
        dense = [i for i, e in enumerate(expert) if e is None]
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(expert):
            if e is not None:
                groups.setdefault(e, []).append(i)
        members = list(groups.values())
        return cls(dense, sum(sizes[i] for i in dense), list(groups), members,
                   [sum(sizes[i] for i in m) for m in members])


def moe_tiers(names: list[str], sizes: list[int], split: tuple[float, float, float],
              hot: list[list[int]] | None = None,
              groups: ExpertGroups | None = None) -> list[int]:
    """Tiers of a mixture-of-experts model's weights: the dense part (attention, norms,
    routers, shared experts, embeddings, head) goes to the compute device first, as far as
    the policy's GPU share holds it; the experts fill the rest of each tier, each expert
    whole (its gate, up and down on one tier) and every layer's experts split in the same
    proportions (assign_tiers' error diffusion), a layer's GPU places to its lowest ids, then
    its CPU places, then disk. hot: tokens routed to each expert of each layer in an earlier
    run (MoEStats.save): the GPU places go to its busiest experts instead (the bytes per tier
    do not change). groups: the grouping of names (ExpertGroups.of) when known."""
    grp = groups or ExpertGroups.of(names, sizes)
    dense, dense_bytes, keys, members = grp.dense, grp.dense_bytes, grp.keys, grp.members
    total = sum(sizes)
    budget = split[0] / 100.0 * total
    out = [0] * len(names)
    if dense_bytes > budget:        # the dense part itself spills: every part as the policy
        for i, t in zip(dense, assign_tiers([sizes[i] for i in dense], split)):
            out[i] = t
        sub = split
    else:
        rest = max(total - dense_bytes, 1)
        gpu = 100.0 * (budget - dense_bytes) / rest
        off = split[1] + split[2]
        sub = (gpu,) + tuple((100.0 - gpu) * x / off if off else 0.0 for x in split[1:])
    tiers = assign_tiers(list(grp.member_bytes), sub)
    # within each layer, the lower tiers to the busier experts (hot), else to the lower ids:
    # each tier's experts then hold consecutive ids, so the host ones lie, and cross to the
    # device, as one run (placement.host_expert_runs, expert_staging.coalesce)
    by_layer: dict[int, list[int]] = {}
    for g, key in enumerate(keys):
        by_layer.setdefault(int(key.split(".")[1]), []).append(g)
    for j, gs in by_layer.items():
        expert = lambda g: int(keys[g].split(".")[3])     # noqa: E731
        order = sorted(gs, key=(lambda g: -hot[j][expert(g)]) if hot is not None else expert)
        for g, t in zip(order, sorted(tiers[g] for g in gs)):
            tiers[g] = t
    for idx, t in zip(members, tiers):
        for i in idx:
            out[i] = t
    return out


def weight_layout(spec: ModelSpec, policy: Policy, elem: int, units: range,
                  cuda: bool, hot: list[list[int]] | None = None
                  ) -> tuple[dict[str, tuple[int, ...]], list[int], list[int]]:
    """(name -> shape, stored bytes, tier index) of the units' weights, in one order: the
    placement a run makes (api) and the one its footprint counts (hot: moe_tiers)."""
    # the names and sizes depend on the spec, units, dtype and weight compression only: a
    # search asks for them hundreds of times (18.6k tensors per call for Qwen3-30B-A3B)
    key = (units.start, units.stop, elem, policy.compress_weight, policy.quant_bits,
           policy.quant_group, spec.num_layers, spec.hidden_size, spec.ffn_dim,
           spec.vocab_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
           spec.num_experts, spec.expert_ffn_dim, tuple(spec.moe_layers or ()),
           spec.tie_word_embeddings, spec.router_kind)
    known = spec.__dict__.setdefault("_layouts", {})     # per spec object (not a field)
    if key not in known:
        shapes = unit_set_shapes(spec, units)
        sizes = [weight_bytes(n, shapes[n], 4 if spec.keeps_fp32(n) else elem, policy)
                 for n in shapes]
        groups = ExpertGroups.of(list(shapes), sizes) if spec.num_experts else None
        known[key] = (shapes, sizes, groups)
    shapes, sizes, groups = known[key]
    return shapes, sizes, weight_tiers(spec, policy, list(shapes), sizes, units, cuda, hot,
                                       groups)


def kv_block_nbytes(spec: ModelSpec, policy: Policy, elem: int, positions: float) -> float:
    """Bytes of one layer's K and V for the whole block at `positions` positions, as stored:
    dense, or compressed as the footprint counts it (memory.quant.kv_slot_nbytes: codes, fp16
    mins and scales, and the exact window ring and sink tokens of every row)."""
    if not policy.compress_cache:
        return 2 * policy.block_size * positions * spec.kv_dim * elem
    return policy.num_gpu_batches * kv_slot_nbytes(
        policy.gpu_batch_size, positions, spec.num_kv_heads, spec.head_dim, elem,
        policy.quant_bits, policy.cache_group, policy.cache_scheme, policy.cache_window,
        policy.cache_sink)


def kv_step_nbytes(spec: ModelSpec, policy: Policy, elem: int, slot_len: int) -> float:
    """Bytes one decode step stores into one layer's cache for the block: its K and V as
    stored (compressed: a position's share of a slot of slot_len positions), plus, with an
    exact ring, their exact copy there."""
    if not policy.compress_cache:
        return kv_block_nbytes(spec, policy, elem, 1)
    fixed = kv_block_nbytes(spec, policy, elem, 0)
    per_pos = (kv_block_nbytes(spec, policy, elem, slot_len) - fixed) / max(slot_len, 1)
    _, tgroup = kv_groups(spec.head_dim, policy.cache_group, policy.cache_scheme)
    ring = kv_ring_len(policy.cache_window, tgroup) > 0
    return per_pos + (2 * policy.block_size * spec.kv_dim * elem if ring else 0)


def footprint(spec: ModelSpec, policy: Policy, elem: int, prompt_len: int | None,
              gen_len: int | None, units: range | None = None, cuda: bool = False) -> Footprint:
    """Peak bytes per tier of the whole model, or of a pipeline stage's `units`; cuda: the
    compute device is a GPU (weight_tiers lays weights out for it)."""
    units = units if units is not None else range(spec.num_units)
    layers = [u for u in units if 1 <= u <= spec.num_layers]
    shapes, sizes, tiers = weight_layout(spec, policy, elem, units, cuda)
    names = list(shapes)
    weights = {t: 0 for t in TIERS}
    tier_of = {}
    for n, s, t in zip(names, sizes, tiers):
        weights[TIERS[t]] += s
        tier_of[n] = TIERS[t]
    size_of = dict(zip(names, sizes))
    streamed = [sum(size_of[n] for n in spec.unit_shapes(u) if tier_of[n] != "gpu")
                for u in units]
    dense_unit = max((sum(numel(s) * elem for s in spec.unit_shapes(u).values())
                      for u in layers), default=0) if policy.compress_weight else 0
    # the unit computing and those loading ahead (Policy.weights_ahead; engine/pipeline.py);
    # a MoE unit's unstaged (4-bit) host experts are left out of its load and held apart: this
    # unit's and the next one's copied ahead (engine/expert_copies.py) fit the same room
    buffers = (1 + (policy.weights_ahead if cuda else 1)) * max(streamed) + dense_unit // 4
    if cuda and spec.num_experts and not policy.compress_weight and any(
            tier_of[n] != "gpu" for n in names if expert_of(n) is not None):
        # engine/expert_staging.py: a MoE layer's experts in stacked slots on the device,
        # twice (the next MoE layer's are copied ahead) where plain experts are staged
        j = spec.first_moe_layer
        buffers += sum(numel(s) * elem for n, s in spec.unit_shapes(j + 1).items()
                       if expert_of(n) is not None) * (2 if plain_experts(spec) else 1)
    cache = {t: 0 for t in TIERS}
    host = max(streamed)
    if prompt_len is not None and gen_len is not None:
        T = prompt_len + gen_len
        per_layer = policy.block_size * T * spec.kv_dim * 2 * elem
        if policy.compress_cache:       # codes, fp16 mins / scales, the exact recent ring
            per_layer = policy.num_gpu_batches * kv_slot_nbytes(
                policy.gpu_batch_size, T, spec.num_kv_heads, spec.head_dim, elem,
                policy.quant_bits, policy.cache_group, policy.cache_scheme, policy.cache_window,
                policy.cache_sink)
        g = policy.gpu_cache_share      # gpu_cache_batches: that share on the device
        for t in assign_tiers([1] * len(layers), policy.cache_split()):
            cache[TIERS[t]] += per_layer * (1 - g)
            cache["gpu"] += per_layer * g
        b = policy.gpu_batch_size
        act = policy.block_size * prompt_len * spec.hidden_size * elem
        # live at the FFN: its input, the normed input, the up-projection (in-place
        # activation; Llama's gate and up are two) and the output; at attention: input,
        # normed input, q, k, v (and the output). Fitted to five H100 peaks: without the two
        # extra hidden-size rows the estimate was 0.08-0.89 GiB short (bench/results S1/S2)
        ffn_live = spec.ffn_dim * (1 if spec.arch == "opt" else 2)
        work = b * prompt_len * max(ffn_live + 3 * spec.hidden_size,
                                    5 * spec.hidden_size) * elem
        work += b * spec.num_heads * prompt_len * min(prompt_len, 1024) * elem
        work += b * spec.vocab_size * 4 * 2
        kv_stream = 0 if policy.cpu_attention else (
            2 * b * T * spec.kv_dim * 2 * elem if policy.cache_gpu < 100 else 0)
        # the prefill's KV stores to host memory in flight (engine/kvcache.StoreHold) hold
        # earlier batches' q/k/v outputs (and k after RoPE) until their copies have run,
        # beside the current batch's in `work`
        qkv = spec.num_heads * spec.head_dim + 3 * spec.kv_dim
        stores = STORES_IN_FLIGHT * b * prompt_len * qkv * elem \
            if cuda and policy.cache_cpu > 0 else 0
        buffers += act + work + kv_stream + stores
        if policy.cpu_attention and policy.cache_gpu < 100:
            host += b * spec.num_heads * T * 4 * 2
    return Footprint(weights, cache, buffers, host, load_transient(shapes, policy, elem, cuda))


def load_transient(shapes: dict, policy: Policy, elem: int, cuda: bool) -> int:
    """Device bytes the load holds beside the weights already placed there: 4-bit weights
    are quantized on the compute device whatever their tier (plan/placement.py), the
    largest one arriving whole in the compute dtype and quantized a block of rows at a
    time (memory/wquant.by_rows: fp32 groups, codes, the round-to-nearest try, ~16 bytes
    a value), its parts and their join. OPT-175B's fc2 unchunked held 8.8 GB."""
    if not (cuda and policy.compress_weight):
        return 0
    big = max((s for n, s in shapes.items() if is_compressible(n, s)), key=numel,
              default=None)
    if big is None:
        return 0
    n = numel(big)
    return n * elem + min(n, LOAD_CHUNK) * 16 + 2 * compressed_nbytes(
        big, policy.quant_bits, policy.quant_group)


def check_budget(spec: ModelSpec, policy: Policy, device: torch.device, dtype: torch.dtype,
                 gpu_mem: int | None, cpu_mem: int | None, disk_mem: int | None,
                 prompt_len: int | None, gen_len: int | None, units: range | None = None,
                 stage: str = "") -> Footprint:
    """Reject a policy whose peak memory exceeds a budget, naming the minimum it needs.

    units/stage: check one pipeline stage (its budgets already its share) and name it."""
    elem = dtype.itemsize
    fp = footprint(spec, policy, elem, prompt_len, gen_len, units, device.type == "cuda")
    when = "" if prompt_len is None else f" for prompts of {prompt_len} tokens + {gen_len} new"
    when += f" on {stage}" if stage else ""
    if device.type == "cuda":
        checks = [("GPU", fp.total("gpu"), gpu_mem, "--gpu-mem"),
                  ("CPU", fp.total("cpu"), cpu_mem, "--cpu-mem")]
    else:  # the compute device is host memory: both tiers count against --cpu-mem
        checks = [("CPU", fp.total("gpu") + fp.total("cpu"), cpu_mem, "--cpu-mem")]
    checks.append(("disk", fp.total("disk"), disk_mem, "--disk-mem"))
    for what, need, budget, flag in checks:
        if budget is not None and need > budget:
            raise FlexrunError(
                f"policy needs {format_size(need)} of {what} memory{when} but {flag} is "
                f"{format_size(budget)}: raise {flag} to at least {format_size(need)}, move "
                "weights/cache to a lower tier, or use --policy auto")
    return fp
