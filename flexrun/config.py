"""Configuration objects: Policy, SamplingParams, memory budgets, user-facing errors."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


class FlexrunError(Exception):
    """An error caused by the user's input or environment: printed as one line, exit code 2."""


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str | int | float | None) -> int | None:
    """Parse '16GiB', '1.5GB', '512MiB' or a byte count into bytes (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise FlexrunError(f"cannot read memory size {text!r}: write it like 16GiB, 512MiB or 2GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    """Bytes as a short human string in GiB/MiB."""
    if n >= 1024**3:
        return f"{n / 1024**3:.2f}GiB"
    return f"{n / 1024**2:.1f}MiB"


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request. temperature 0 (default) is greedy.

    seed: a request's sample j draws from a generator seeded from (seed, j) only, so its
    samples do not depend on its batch; without a seed, from (a fresh seed, prompt index).
    max_tokens caps this request's new tokens (never above the call's max_new_tokens);
    n samples share one prefill; stop strings are matched on the decoded text across token
    boundaries and the output is cut before the match; logprobs / top_logprobs give each
    generated token's log-probability (log-softmax of the model's logits) and the top k;
    prompt_logprobs k gives each prompt token's and the top k at every prompt position."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None

    MAX_TOP = 20
    MAX_STOP = 4

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise FlexrunError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise FlexrunError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise FlexrunError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise FlexrunError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise FlexrunError(f"n must be >= 1, got {self.n}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if len(self.stop) > self.MAX_STOP or not all(isinstance(s, str) and s for s in self.stop):
            raise FlexrunError(f"stop must be up to {self.MAX_STOP} non-empty strings, "
                               f"got {self.stop!r}")
        if not 0 <= self.top_logprobs <= self.MAX_TOP:
            raise FlexrunError(f"top_logprobs must be in 0..{self.MAX_TOP}, "
                               f"got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise FlexrunError("top_logprobs needs logprobs: set logprobs too")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= self.MAX_TOP:
            raise FlexrunError(f"prompt_logprobs must be in 0..{self.MAX_TOP}, "
                               f"got {self.prompt_logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


# the device memory that KV and activation stores (GPU -> host copies) in flight may hold, in
# prefill stores (q/k/v outputs): engine/kvcache.StoreHold; counted by plan/footprint.py
STORES_IN_FLIGHT = 1

_TRIPLES = (("weights_gpu", "weights_cpu", "weights_disk"),
            ("cache_gpu", "cache_cpu", "cache_disk"),
            ("act_gpu", "act_cpu", "act_disk"))


@dataclass
class Policy:
    """Where weights, KV cache and activations live (percent per tier) and how the block runs.

    "gpu" means the compute device: on a CPU-only run it is host memory, like "cpu".
    A block is gpu_batch_size x num_gpu_batches prompts sharing each layer's weight load.
    """
    gpu_batch_size: int = 8
    num_gpu_batches: int = 1
    weights_gpu: float = 100.0
    weights_cpu: float = 0.0
    weights_disk: float = 0.0
    cache_gpu: float = 100.0
    cache_cpu: float = 0.0
    cache_disk: float = 0.0
    act_gpu: float = 100.0
    act_cpu: float = 0.0
    act_disk: float = 0.0
    # the first gpu_cache_batches GPU batches of each block keep their KV cache on the compute
    # device and attend there, whatever cache_* say; the others follow cache_* (off the
    # device with cpu_attention: attended on the host): part of each layer's keys at HBM rate
    gpu_cache_batches: int = 0
    # streamed units whose weights load ahead of the one computing on a GPU: 1 double-buffers;
    # 2 holds one more unit's weights on the device, so that a unit slower than its copy
    # (CPU attention) lends its slack to a later one faster than its copy (KV on the device)
    weights_ahead: int = 1
    overlap: bool = True
    cuda_graphs: bool = True        # replay captured decode steps of GPU-resident units
    cpu_attention: bool = False
    pin_weights: bool = True
    compress_weight: bool = False
    compress_cache: bool = False
    quant_bits: int = 4
    quant_group: int = 64
    # compress_cache: "kivi" (keys per channel in groups of cache_group tokens, values per
    # token in groups of cache_group along the head dim) or "per_token" (FlexGen: K and V in
    # groups of cache_group along the head dim); the last cache_window tokens stay exact
    # (kivi: until their key group fills too), and each prompt's first cache_sink tokens
    # (attention sinks). quant_bits is the cache's bits too; quant_group is the weights' group
    cache_scheme: str = "kivi"
    cache_group: int = 32
    cache_window: int = 32
    cache_sink: int = 4
    # compress_weight: "rtn" (min-max round to nearest), "hqq" (half-quadratic search of
    # each group's zero and scale) or "synth" (grid search of each group's range weighted by
    # activations measured on random tokens); memory/wquant.py
    weight_scheme: str = "synth"
    # mixture of experts: a routed expert whose weights live in host memory or on disk is
    # "copy"-ed to the compute device, computed on the "cpu" where it lives, or "auto": both
    # lanes at once, split so that they finish together (engine/experts.py)
    expert_lanes: str = "auto"

    CACHE_SCHEMES = ("kivi", "per_token")
    WEIGHT_SCHEMES = ("rtn", "hqq", "synth")
    EXPERT_LANES = ("auto", "copy", "cpu")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise FlexrunError(f"policy: {name} must be an integer >= 1, got {v!r}")
        for triple in _TRIPLES:
            vals = [getattr(self, n) for n in triple]
            for n, v in zip(triple, vals):
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 100:
                    raise FlexrunError(f"policy: {n} must be a percentage in 0..100, got {v!r}")
            if abs(sum(vals) - 100.0) > 1e-6:
                raise FlexrunError(f"policy: {' + '.join(triple)} must sum to 100, "
                                   f"got {sum(vals):g}")
        if self.quant_bits not in (4, 8):
            raise FlexrunError(f"policy: quant_bits must be 4 or 8, got {self.quant_bits}")
        if self.quant_group < 1:
            raise FlexrunError(f"policy: quant_group must be >= 1, got {self.quant_group}")
        for name, known in (("cache_scheme", self.CACHE_SCHEMES),
                            ("weight_scheme", self.WEIGHT_SCHEMES),
                            ("expert_lanes", self.EXPERT_LANES)):
            if getattr(self, name) not in known:
                raise FlexrunError(f"policy: {name} must be one of {', '.join(known)}, "
                                   f"got {getattr(self, name)!r}")
        for name in ("cache_window", "cache_sink"):
            w = getattr(self, name)
            if not isinstance(w, int) or isinstance(w, bool) or w < 0:
                raise FlexrunError(f"policy: {name} must be an integer >= 0, got {w!r}")
        g = self.gpu_cache_batches
        if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g <= self.num_gpu_batches:
            raise FlexrunError(f"policy: gpu_cache_batches must be an integer in 0.."
                               f"{self.num_gpu_batches} (num_gpu_batches), got {g!r}")
        a = self.weights_ahead
        if not isinstance(a, int) or isinstance(a, bool) or not 1 <= a <= 3:
            raise FlexrunError(f"policy: weights_ahead must be an integer in 1..3, got {a!r}")
        if not isinstance(self.cache_group, int) or isinstance(self.cache_group, bool) \
                or self.cache_group < 1:
            raise FlexrunError(f"policy: cache_group must be an integer >= 1, got "
                               f"{self.cache_group!r}")

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    def compression(self) -> str:
        """What the 4-bit settings are, in words ("" when nothing is compressed)."""
        parts = []
        if self.compress_weight:
            parts.append(f"weights {self.weight_scheme}, {self.quant_bits}-bit groups of "
                         f"{self.quant_group}")
        if self.compress_cache:
            parts.append(f"KV cache {self.cache_scheme}, {self.quant_bits}-bit groups of "
                         f"{self.cache_group}, window {self.cache_window}, sinks "
                         f"{self.cache_sink}")
        return "; ".join(parts)

    def weights_split(self) -> tuple[float, float, float]:
        return (self.weights_gpu, self.weights_cpu, self.weights_disk)

    def cache_split(self) -> tuple[float, float, float]:
        return (self.cache_gpu, self.cache_cpu, self.cache_disk)

    @property
    def gpu_cache_share(self) -> float:
        """The share of each layer's KV cache on the device for gpu_cache_batches."""
        return self.gpu_cache_batches / self.num_gpu_batches

    def act_split(self) -> tuple[float, float, float]:
        return (self.act_gpu, self.act_cpu, self.act_disk)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"comment", "command", "predicted"})
        if unknown:
            raise FlexrunError(f"policy: unknown key(s) {', '.join(unknown)}; "
                               f"known keys are {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path, **extra) -> None:
        Path(path).write_text(json.dumps({**extra, **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        p = Path(path)
        if not p.is_file():
            raise FlexrunError(f"policy file {p} not found: pass an existing JSON file or 'auto'")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise FlexrunError(f"policy file {p} is not valid JSON ({e.msg} at line {e.lineno})")
        if not isinstance(d, dict):
            raise FlexrunError(f"policy file {p} must hold a JSON object")
        return cls.from_dict(d)
