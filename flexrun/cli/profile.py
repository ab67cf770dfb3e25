"""`flexrun profile`: measure this machine for the cost model and write the profile JSON."""
from __future__ import annotations

import torch

from flexrun.plan.hardware import format_profile, measure


def profile_command(args) -> int:
    """`flexrun profile -o hw.json [--offload-dir D] [--device cuda|cpu]`."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cmd = f"flexrun profile -o {args.output} --device {device}"
    if args.offload_dir:
        cmd += f" --offload-dir {args.offload_dir}"
    prof = measure(device, args.offload_dir, command=cmd)
    if device.startswith("cuda"):   # the engine's own layers (above the plan package)
        from flexrun.cli.layer_calls import measure_layer_calls
        try:
            prof.gpu_layer_calls = measure_layer_calls(device)
            prof.notes["gpu_layer_calls"] = "flexrun.cli.layer_calls (tiny models, eager)"
        except Exception as e:      # the rest of the profile stands without them
            prof.notes["gpu_layer_calls"] = f"not measured: {type(e).__name__}: {e}"[:300]
    prof.save(args.output)
    print(format_profile(prof))
    print(f"profile written to {args.output}")
    return 0
