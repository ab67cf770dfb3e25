"""The fused 4-bit decode attention (kernels/qattention.py) matches reading the compressed
slot to dense K and V and attending over it, for both schemes, with and without the exact
window ring and the sink tokens, left padding and grouped-query heads; every source of a key
or value (codes, ring, sinks) counts.

Runs on CUDA, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1 in a child
process); skipped where Triton is not installed. On CUDA a run with the cache on the device
gives the tokens of the same run without the fused kernel."""
import pytest
import torch

from conftest import ragged_prompts, run_triton_check
from flexrun import LLM, Policy, SamplingParams

triton = pytest.importorskip("triton")

CHECK = r"""
import torch
from flexrun.engine.attention import attend_slot
from flexrun.engine.kvcache import KVSlot
from flexrun.engine.kvquant import CompressedKVSlot
from flexrun.kernels import qattention as qa
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
g = torch.Generator().manual_seed(0)

def make(shape, dtype, part=""):
    return KVSlot("gpu", False, shape, dtype, dev, None, "t." + part, None, None, None, part,
                  False)

def run(q, planes, start, last):
    return qa.decode_qattention(q, planes, start, last).float().cpu()

for scheme, group, window, sink, b, nh, kvh, hd, P, steps in [
        ("kivi", 32, 32, 4, 3, 4, 4, 64, 70, 5), ("kivi", 16, 0, 0, 2, 8, 2, 128, 100, 3),
        ("per_token", 32, 0, 0, 2, 4, 2, 64, 40, 2), ("per_token", 16, 8, 2, 3, 6, 3, 32, 90, 7),
        ("kivi", 32, 64, 4, 2, 4, 1, 64, 300, 4)]:
    T = P + steps + 3
    slot = CompressedKVSlot(make, (b, kvh, T, hd), torch.float16, 4, group, scheme, window,
                            sink)
    first = torch.randint(0, 12, (b,), generator=g)
    first[0] = 0
    K = torch.randn(b, kvh, T, hd, generator=g).half()
    V = torch.randn(b, kvh, T, hd, generator=g).half()
    K[..., 3] *= 8                                      # an outlier channel
    slot.write(K[:, :, :P].to(dev), V[:, :, :P].to(dev), 0, first.to(dev))
    for t in range(P, P + steps):
        slot.write(K[:, :, t:t + 1].to(dev), V[:, :, t:t + 1].to(dev), t)
    t_end = P + steps
    q = torch.randn(b, nh, 1, hd, generator=g).half().to(dev)
    Kd, Vd = slot.read(t_end, dev)
    start, last = first.to(dev), torch.tensor([t_end - 1], device=dev)
    pos = torch.arange(t_end, device=dev)
    mask = ((pos >= start[:, None]) & (pos <= last))[:, None, None, :]
    want = attend_slot(q.float(), Kd.float(), Vd.float(), mask).float().cpu().view(b, 1, -1)
    planes = slot.quant_planes(t_end, dev)
    assert qa.applies(q, planes)
    got = run(q, planes, start, last)
    err = (got - want).abs().max().item()
    assert err < 3e-3, (scheme, group, window, sink, err)
    # each source counts: a code, an exact ring value, a sink key
    moved = {}
    c = planes.v_codes.clone()
    c[0, 0, first[0] + sink + 1] ^= 0x33
    moved["codes"] = run(q, qa.QuantPlanes(**{**planes.__dict__, "v_codes": c}), start, last)
    if planes.ring_v is not None and planes.quantized_values < t_end:
        r = planes.ring_v.clone()
        r[0, 0, (t_end - 1) % r.shape[2]] += 4.0
        moved["ring"] = run(q, qa.QuantPlanes(**{**planes.__dict__, "ring_v": r}), start, last)
    if planes.sink_k is not None:
        s = planes.sink_k.clone()
        s[0, 0, 0] += 4.0
        moved["sink"] = run(q, qa.QuantPlanes(**{**planes.__dict__, "sink_k": s}), start, last)
    for what, out in moved.items():
        assert (out - got).abs().max().item() > 1e-3, (scheme, what)
# gpt-oss's sink logits (one per head) join the merge's denominator, as on the matmul route
from flexrun.models.spec import AttentionOptions
logits = torch.linspace(-3.0, 6.0, nh)
want = attend_slot(q.float(), Kd.float(), Vd.float(), mask, AttentionOptions(sink=logits))
got = qa.decode_qattention(q, planes, start, last, sink_logits=logits.to(dev)).float().cpu()
assert (got - want.float().cpu().view(b, 1, -1)).abs().max().item() < 3e-3
print("ok")
"""


def test_fused_4bit_attention_matches_the_dequantized_slot():
    run_triton_check(CHECK)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["kivi", "per_token"])
def test_cuda_run_with_the_fused_kernel_keeps_the_tokens(llama_dir, tmp_path, monkeypatch,
                                                         scheme):
    """fp16 on a GPU, the 4-bit cache on the device and on the host (brought to the GPU):
    greedy tokens with the fused kernel against FLEXRUN_PLAIN_ATTENTION=1 (read + SDPA)."""
    prompts = ragged_prompts(6)
    greedy = SamplingParams(ignore_eos=True)
    quant = dict(compress_cache=True, cache_group=4, cache_window=3, cache_sink=1,
                 cache_scheme=scheme)
    outs = {}
    for plain in ("0", "1"):
        monkeypatch.setenv("FLEXRUN_PLAIN_ATTENTION", plain)
        for name, kw in {"gpu": {}, "cpu": dict(cache_gpu=0, cache_cpu=100)}.items():
            with LLM(str(llama_dir), device="cuda", policy=Policy(**quant, **kw),
                     offload_dir=str(tmp_path)) as llm:
                outs[plain, name] = [o.output_ids for o in llm.generate(prompts, 8, greedy)]
    same = sum(a == b for k in ("gpu", "cpu") for a, b in zip(outs["0", k], outs["1", k]))
    assert same >= 10, outs          # fp16 kernels differ in rounding: 10 of 12 outputs
