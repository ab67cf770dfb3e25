"""Grouped GEMMs over 4-bit experts (kernels/grouped4.py) against each expert's dequantized
weights, and a MoE layer whose 4-bit experts are all resident and joined taking them (no host
sync) with the per-expert route's output.

Runs on CUDA, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1 in a child
process); skipped without Triton."""
import pytest

from conftest import run_triton_check

triton = pytest.importorskip("triton")

KERNEL_CHECK = r"""
import torch
from flexrun.memory.quant import compress, decompress_plain, join_rows
from flexrun.models.common import joined
from flexrun.kernels.grouped4 import experts4, grouped4_mm, stack4
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
# (experts, out, in, group, rows per expert): empty groups, ragged N, every group size, K
# tails short of the 128-deep tile, row blocks of 16, 32 and 64
for E, N, K, G, counts in [(3, 48, 256, 64, [5, 0, 12]), (4, 100, 384, 32, [1, 2, 40, 3]),
                           (2, 64, 128, 128, [20, 20]), (3, 40, 192, 64, [70, 0, 90])]:
    ws = [(torch.randn(N, K, generator=g) * 0.05).half().to(dev) for _ in range(E)]
    cs = join_rows([compress(w, 4, G, -1) for w in ws])
    st = stack4(joined(cs), E)
    assert st is not None and st.shape == (E, N, K)
    # the same experts found through their own buffers (copies held apart): equal results
    apart = experts4([compress(w, 4, G, -1) for w in ws])
    M = sum(counts) + 3                      # rows past the last group's end: zeros
    x = torch.randn(M, K, generator=g).half().to(dev)
    ends = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
    y = grouped4_mm(x, st, ends).float()
    assert torch.equal(grouped4_mm(x, apart, ends).float(), y)
    start = 0
    for e, n in enumerate(counts):
        ref = x[start:start + n].float() @ decompress_plain(cs[e], torch.float16).float().T
        if n:
            assert (y[start:start + n] - ref).abs().max().item() < 2e-2, (E, N, K, G, e)
        start += n
    assert y[start:].abs().max().item() == 0
# not stackable: 8-bit codes, groups the kernel lacks, not joined
assert stack4(compress(torch.randn(8, 128).half().to(dev), 8, 64, -1), 2) is None
assert stack4(compress(torch.randn(8, 128).half().to(dev), 4, 16, -1), 2) is None
print("ok")
"""

LAYER_CHECK = r"""
import torch
from flexrun.memory.quant import compress, join_rows
from flexrun.models import moe
from flexrun.models.moe_grouped import stacked_experts
from flexrun.models.spec import ModelSpec
dev = "cuda" if torch.cuda.is_available() else "cpu"
E, k, h, f = 6, 2, 64, 96
spec = ModelSpec(arch="llama", family="mixtral", vocab_size=16, hidden_size=h, num_layers=1,
                 num_heads=4, num_kv_heads=4, head_dim=h // 4, ffn_dim=f, max_positions=16,
                 num_experts=E, experts_per_token=k, expert_ffn_dim=f,
                 router_kind="topk_softmax")
g = torch.Generator().manual_seed(1)
plain = {f"experts.{e}.{p}.weight": compress((torch.randn(*s, generator=g) * 0.1).half()
                                            .to(dev), 4, 32, -1)
         for e in range(E) for p, s in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f)))}
plain["router.weight"] = torch.randn(E, h, generator=g).half().to(dev)
joined_w = dict(plain)
gu = [plain[f"experts.{e}.{p}.weight"] for e in range(E) for p in ("gate", "up")]
down = [plain[f"experts.{e}.down.weight"] for e in range(E)]
for names, cs in (([f"experts.{e}.{p}.weight" for e in range(E) for p in ("gate", "up")], gu),
                  ([f"experts.{e}.down.weight" for e in range(E)], down)):
    joined_w.update(zip(names, join_rows(cs)))      # as TieredStore.join lays them out
assert stacked_experts(plain, E) is None and stacked_experts(joined_w, E) is not None
x = torch.randn(2, 9, h, generator=g).half().to(dev)
calls = []
orig = moe.grouped_experts
moe.grouped_experts = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
loop = moe.moe_mlp(x, plain, spec).float()           # expert by expert
assert not calls
grouped = moe.moe_mlp(x, joined_w, spec).float()     # two grouped 4-bit launches
assert calls == [1]
err = (grouped - loop).abs().max().item()
assert err < 1e-2 * loop.abs().max().item() + 1e-3, err
print("ok")
"""


def test_grouped_4bit_gemms_match_dequantized_experts():
    run_triton_check(KERNEL_CHECK)


def test_resident_4bit_experts_run_as_grouped_gemms():
    run_triton_check(LAYER_CHECK)

RUN_CHECK = r"""
import sys, tempfile, pathlib
sys.path.insert(0, "tests")
import torch
from families import save_family
from conftest import ragged_prompts
from flexrun import LLM, Policy, SamplingParams
from flexrun.engine import expert_copies
from flexrun.kernels import grouped4
expert_copies.HELD_AHEAD_ON_CPU = True          # the copies as on a GPU run
device = "cuda" if torch.cuda.is_available() else "cpu"     # (else Triton's interpreter)
# OLMoE: 8 experts, top-3, hidden 64 and expert FFN 32: groups of 32 fit both GEMMs
d = save_family("olmoe", pathlib.Path(tempfile.mkdtemp()) / "m")
prompts = [p for seed in (5, 6) for p in ragged_prompts(8, seed=seed)][:8]
pol = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_gpu=30, weights_cpu=70,
             expert_lanes="copy", compress_weight=True, quant_group=32, weight_scheme="rtn")
calls = []
real = grouped4.grouped4_mm
def spy(*a):
    calls.append(1)
    return real(*a)
import flexrun.models.moe_grouped as mg
mg.grouped4_mm = spy
out = {}
for grouped in (True, False):
    import os
    os.environ["FLEXRUN_TRITON_GROUPED"] = "1" if grouped else "0"
    calls.clear()
    with LLM(str(d), device=device, policy=pol, dtype="float16") as llm:
        out[grouped] = ([o.output_ids for o in llm.generate(prompts, 5,
                                                               SamplingParams(ignore_eos=True))],
                        llm.prompt_logits(prompts[:2]))
        lane = llm.pipeline.experts.stats
    assert bool(calls) == grouped, (grouped, len(calls))
    assert lane.copied > 0
same = sum(a == b for x, y in zip(out[True][0], out[False][0]) for a, b in zip(x, y))
total = sum(len(x) for x in out[True][0])
assert same >= 0.8 * total, (same, total)
for a, b in zip(out[True][1], out[False][1]):
    assert (a.float() - b.float()).abs().max().item() <= 2e-2 * b.float().abs().max().item()
print("ok")
"""


def test_split_4bit_experts_run_as_grouped_gemms_over_held_copies():
    """4-bit experts split over tiers on the copy lane, the block's calls touching all of
    them: the unit's host experts are copied and held, and every call runs them with the
    resident ones as two grouped 4-bit GEMMs through their address tables; its tokens and
    prompt logits are those of the per-expert route (FLEXRUN_TRITON_GROUPED=0), within the
    two kernels' summation order."""
    run_triton_check(RUN_CHECK)
