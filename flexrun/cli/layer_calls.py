"""Host seconds of one eager decode layer call (one GPU batch), by layer kind, timed with the
engine's own layers on tiny models (dummy:llama-tiny, dummy:mixtral-tiny): at such sizes the
GPU waits on the host's launches, which is where a decode step of many small GPU batches
sits when its units are not replayed from CUDA graphs (a 4-bit MoE layer over a 4-bit cache
launches ~170 kernels a batch; S6q's 32 x 8 plan on the H100: 0.86 s a step, 3.4 ms a
layer call). The cost model takes them as each call's floor (plan/unit_terms.py).

python -m flexrun.cli.layer_calls [--update PROFILE.json|matching]: print them (JSON), and
write them into a profile's gpu_layer_calls (matching: the shipped profile of this GPU).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from flexrun.api import LLM
from flexrun.config import Policy, SamplingParams
from flexrun.plan.hardware import HardwareProfile, layer_kind, matching_profile


def layer_kinds() -> dict[str, tuple[str, bool, bool]]:
    """kind -> (dummy preset, 4-bit weights, 4-bit KV cache)."""
    return {layer_kind(moe, w4, kv4): ("mixtral-tiny" if moe else "llama-tiny", w4, kv4)
            for moe in (False, True) for w4 in (False, True) for kv4 in (False, True)}


def layer_call_s(preset: str, w4: bool, kv4: bool, device: str = "cuda", rows: int = 4,
                 batches: int = 2, steps: int = 12, reps: int = 3) -> float:
    """Seconds per layer call per GPU batch of `preset`'s decode, every tensor on the device,
    eager (no CUDA graphs): the fastest of `reps` runs' mean decode step over the layers
    plus one (the embedding, the head and the sampler together counted as one more)."""
    pol = Policy(gpu_batch_size=rows, num_gpu_batches=batches, cuda_graphs=False,
                 compress_weight=w4, compress_cache=kv4, weight_scheme="rtn")
    greedy = SamplingParams(ignore_eos=True)
    with LLM(f"dummy:{preset}", device=device, policy=pol, dtype="float16") as llm:
        prompts = [[5 + i] * 16 for i in range(rows * batches)]
        llm.generate(prompts, 4, greedy)                # compiles the kernels
        best = float("inf")
        for _ in range(reps):
            llm.stats = type(llm.stats)()
            llm.generate(prompts, steps, greedy)
            best = min(best, llm.stats.decode_s / (steps - 1))
        return best / ((llm.spec.num_layers + 1) * batches)


def measure_layer_calls(device: str = "cuda") -> dict[str, float]:
    """layer_call_s of every layer_kinds() kind."""
    return {kind: layer_call_s(preset, w4, kv4, device)
            for kind, (preset, w4, kv4) in layer_kinds().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", default=None,
                    help="profile JSON to write them into (matching: this GPU's shipped one)")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    if a.update and not a.device.startswith("cuda"):
        raise SystemExit("layer_calls: --update writes a GPU profile's term: pass --device cuda")
    t0 = time.perf_counter()
    calls = measure_layer_calls(a.device)
    print(json.dumps({"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                      "gpu_layer_calls": calls, "s": time.perf_counter() - t0}))
    path = matching_profile(a.device) if a.update == "matching" else a.update
    if a.update == "matching" and path is None:
        print("no shipped profile matches this GPU and host: pass --update PROFILE.json")
    if path:
        print(f"written into {path}")
        prof = HardwareProfile.load(path)
        prof.gpu_layer_calls = calls
        prof.notes["gpu_layer_calls"] = (f"python -m flexrun.cli.layer_calls --update, "
                                         f"{time.strftime('%Y-%m-%d')}")
        prof.save(path)


if __name__ == "__main__":
    main()
