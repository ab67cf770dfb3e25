"""GPU rows for every family (dense and mixture of experts): flexrun on CUDA (fp16; Gemma-2,
Gemma-3 and gpt-oss bf16) against transformers on CUDA in the same dtype, token agreement per
family; and flexrun's own paths on CUDA (offloaded with CPU attention, CUDA graphs off, 4-bit
weights) against its resident run.

python -m bench.gpu_families OUT.json [FAMILY...]   (on the GPU machine; bench.gpu_smoke runs
it too). Named families are rerun and merged into an existing OUT.json; none names them all.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ragged_prompts  # noqa: E402
from families import SHAPES, save_family  # noqa: E402
from flexrun import LLM, Policy, SamplingParams  # noqa: E402

GREEDY = SamplingParams(ignore_eos=True)
NEW = 24


def agreement(a, b) -> float:
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    return same / max(sum(len(p) for p in a), 1)


def hf_cuda(d: Path, prompts, dtype: torch.dtype) -> list[list[int]]:
    """transformers generating each prompt alone on CUDA (EOS neither stops nor is masked)."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype).cuda().eval()
    m.generation_config.eos_token_id = None
    outs = []
    for p in prompts:
        with torch.no_grad():
            g = m.generate(torch.tensor([p], device="cuda"), max_new_tokens=NEW,
                           do_sample=False, pad_token_id=0)
        outs.append(g[0, len(p):].tolist())
    return outs


def logit_errors(d: Path, prompts, dtype: torch.dtype) -> dict:
    """Max |logit difference| / max |logit| over the prompts' positions: flexrun on CUDA in
    `dtype` against transformers on CUDA in the same dtype and in fp32."""
    from transformers import AutoModelForCausalLM
    with LLM(str(d), device="cuda") as llm:
        ours = llm.prompt_logits(prompts)
    out = {}
    for ref_dtype in (dtype, torch.float32):
        m = AutoModelForCausalLM.from_pretrained(str(d), dtype=ref_dtype).cuda().eval()
        worst = 0.0
        for p, lg in zip(prompts, ours):
            with torch.no_grad():
                ref = m(torch.tensor([p], device="cuda")).logits[0].float().cpu()
            worst = max(worst, float((lg.float() - ref).abs().max() / ref.abs().max()))
        out["logits_rel_err_vs_hf_" + str(ref_dtype).replace("torch.", "")] = worst
        del m
    return out


def family_rows(tmp: Path, names: list[str]) -> dict:
    prompts = ragged_prompts(8, seed=11)
    rows = {}
    for name in names:
        d = save_family(name, tmp / name)
        row = {}
        with LLM(str(d), device="cuda") as llm:
            dtype = llm.dtype
            res = [o.output_ids for o in llm.generate(prompts, NEW, GREEDY)]
        row["dtype"] = str(dtype).replace("torch.", "")
        row["vs_transformers_cuda"] = agreement(res, hf_cuda(d, prompts, dtype))
        row.update(logit_errors(d, prompts, dtype))
        with LLM(str(d), device="cpu") as llm:
            row["vs_flexrun_cpu_fp32"] = agreement(
                res, [o.output_ids for o in llm.generate(prompts, NEW, GREEDY)])
        variants = {
            "offload_cpu_attention": dict(policy=Policy(
                gpu_batch_size=3, num_gpu_batches=2, weights_gpu=20, weights_cpu=40,
                weights_disk=40, cache_gpu=0, cache_cpu=100, act_gpu=0, act_cpu=100,
                cpu_attention=True)),
            "kv_cpu_gpu_attention": dict(policy=Policy(
                gpu_batch_size=4, num_gpu_batches=2, cache_gpu=0, cache_cpu=100)),
            "graphs_off": dict(policy=Policy(gpu_batch_size=8, cuda_graphs=False)),
            "w4": dict(compress_weight=True),
            "w4_kv4": dict(compress_weight=True, compress_cache=True),
        }
        for vname, kw in variants.items():
            with LLM(str(d), device="cuda", offload_dir=str(tmp), **kw) as llm:
                got = [o.output_ids for o in llm.generate(prompts, NEW, GREEDY)]
            row[vname] = agreement(got, res)
        rows[name] = row
        print(name, row, flush=True)
    return rows


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:] or sorted(SHAPES)
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown families {unknown}: pick from {sorted(SHAPES)}")
    tmp = Path("/tmp/flexrun-families")
    tmp.mkdir(exist_ok=True)
    kept = json.loads(out.read_text())["families"] if out.exists() and sys.argv[2:] else {}
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "families": {**kept, **family_rows(tmp, names)}}
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
