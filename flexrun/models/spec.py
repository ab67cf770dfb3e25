"""ModelSpec: the dimensions of a model and the names/shapes of the weights of each unit.

A model runs as a list of *units*: unit 0 is the input embedding, units 1..L the decoder
layers, unit L+1 the output head. Each unit owns a set of canonical weight names
(e.g. "layers.3.q.weight"); a tied lm_head simply names the embedding's tensor again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from flexrun.config import FlexrunError

# HF model_type values each math runs (README: supported architectures)
FAMILIES = {"opt": "opt", "llama": "llama", "mistral": "llama", "qwen2": "llama",
            "qwen3": "llama", "phi3": "llama", "gemma2": "llama", "gemma3_text": "llama",
            "gemma3": "llama", "smollm3": "llama", "olmo2": "llama", "olmo3": "llama",
            "mixtral": "llama", "qwen2_moe": "llama", "qwen3_moe": "llama", "gpt_oss": "llama",
            "olmoe": "llama", "glm4_moe": "llama", "llama4_text": "llama", "llama4": "llama",
            "granite": "llama", "ministral": "llama", "ministral3": "llama", "seed_oss": "llama",
            "exaone4": "llama"}
# how a router turns logits into the top-k experts' weights (models/moe.py)
ROUTERS = ("topk_softmax",      # Mixtral, gpt-oss: softmax over the top-k logits
           "softmax_topk",      # Qwen MoE: softmax over all, top-k, renormalised if norm_topk_prob
           "sigmoid_group",     # GLM-4.5 (DeepSeek-V3's): sigmoid scores, top-k among the best
#                                 groups by scores + a correction bias, renormalised, scaled
           "sigmoid_topk")      # Llama 4: sigmoid of the top-k logits
# the experts' gated activations: silu(gate) * up, or gpt-oss's clamped one
# (up + 1) * gate * sigmoid(alpha * gate), gate <= limit, |up| <= limit
EXPERT_ACTS = ("silu", "swiglu_clamp")


@dataclass(frozen=True)
class AttentionOptions:
    """How one layer attends, beyond plain causal softmax(q k^T / sqrt(head_dim)) v."""
    scale: float | None = None      # None: head_dim ** -0.5
    softcap: float | None = None    # scores -> softcap * tanh(scores / softcap) (Gemma-2)
    window: int | None = None       # a query sees the last `window` positions, itself included
    # gpt-oss: each head's learned sink logit joins the softmax (weighing no value); the
    # layer's (heads,) tensor, set where the weights are at hand (engine/attention.py)
    sink: object = field(default=None, compare=False)

    @property
    def plain(self) -> bool:
        return self.scale is None and self.softcap is None and self.window is None \
            and self.sink is None


@dataclass
class ModelSpec:
    arch: str                     # the math: "opt" or "llama" (Llama-style decoders)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_positions: int
    norm_eps: float = 1e-5
    # OPT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    final_layer_norm: bool = True
    # Llama
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rotary_dim: int | None = None     # the leading head dims RoPE rotates (None: all)
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    family: str = ""              # HF model_type (FAMILIES; Gemma-3 text or multimodal: gemma3)
    qkv_bias: bool = False        # q/k/v biases without an o bias (Qwen2)
    qk_norm: bool = False         # RMSNorm over each head of q and k before RoPE (Qwen3)
    qk_norm_whole: bool = False   # ... over all of q's and all of k's heads at once (OLMo-2)
    pre_norms: bool = True        # norms before attention and MLP (OLMo-2: none, only after)
    clip_qkv: float | None = None  # q, k and v clamped to +-clip_qkv (OLMoE's option)
    norm_fp32_scale: bool = False  # RMSNorm scales in fp32, then casts (OLMo-2; Gemma too)
    norm_offset: float = 0.0      # RMSNorm scales by (offset + weight) in fp32 (Gemma: 1)
    sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma-2)
    mlp_act: str = "silu"         # gated MLP activation: silu | gelu_tanh
    embed_scale: bool = False     # embeddings times sqrt(hidden_size) (Gemma)
    # Granite's multipliers: embeddings times embed_multiplier, attention and MLP outputs
    # times residual_multiplier before their residual adds, logits divided by logits_divisor
    embed_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    query_scale: float | None = None     # attention scale (None: head_dim ** -0.5)
    attn_softcap: float | None = None    # attention logit soft-capping (Gemma-2)
    final_softcap: float | None = None   # final logit soft-capping (Gemma-2)
    sliding_window: int | None = None    # attention window of the windowed layers
    window_layers: tuple[int, ...] | None = None   # the windowed layers (None: every layer)
    # Gemma-3: the sliding-attention layers rotate by a RoPE of their own base, unscaled
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None     # (OLMo-3: its own rope_parameters)
    local_rope_layers: tuple[int, ...] = ()
    nope_layers: tuple[int, ...] = ()    # layers whose q/k are not rotated (SmolLM3: every 4th)
    attn_sinks: bool = False             # a learned sink logit per head and layer (gpt-oss)
    qk_l2_norm: bool = False      # q and k RMS-normed without weights after RoPE (Llama 4)
    rope_fp32: bool = False       # q and k rotated in fp32, rounded once (Llama 4's complex RoPE)
    # (beta, period): queries times 1 + beta * ln(1 + floor(position / period)) after RoPE
    # (Ministral 3's long-context scaling; 1 before `period`)
    query_pos_scale: tuple[float, int] | None = None
    # mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE); num_experts 0: a dense model
    num_experts: int = 0
    experts_per_token: int = 0    # top-k
    expert_ffn_dim: int = 0
    shared_expert_ffn_dim: int = 0       # Qwen2-MoE's shared expert (0: none)
    shared_expert_gate: bool = True      # it is scaled by sigmoid(shared_gate(x)) (GLM: not)
    norm_topk_prob: bool = False         # softmax_topk: renormalise the top-k weights
    router_kind: str = "topk_softmax"    # ROUTERS
    router_bias: bool = False            # the router has a bias (gpt-oss)
    # sigmoid_group: experts in n_group groups, the top-k picked within the topk_group best
    # groups (a group's score: its two best), weights times routed_scaling; the router's
    # "router.correction" (E,) biases the choice, not the weights
    n_group: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0
    expert_bias: bool = False            # the experts' gate, up and down have biases (gpt-oss)
    expert_act: str = "silu"             # EXPERT_ACTS
    expert_input_scaled: bool = False    # the routing weight scales an expert's input, not
    #                                      its output (Llama 4)
    swiglu_alpha: float = 1.702          # swiglu_clamp's alpha and limit
    swiglu_limit: float = 7.0
    moe_layers: tuple[int, ...] | None = None   # the MoE layers (None: every layer); the
    #                                             others keep a dense MLP of ffn_dim
    routing: str = "router"       # router | uniform | zipf:<s> (dummy models' drawn experts)
    # tokens
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.arch not in ("opt", "llama"):
            raise FlexrunError(f"unsupported architecture {self.arch!r}: flexrun runs "
                               f"{', '.join(sorted(FAMILIES))} models")
        if self.mlp_act not in ("silu", "gelu_tanh"):
            raise FlexrunError(f"MLP activation {self.mlp_act!r} is not supported (silu, "
                               "gelu_pytorch_tanh)")
        if self.expert_act not in EXPERT_ACTS:
            raise FlexrunError(f"expert activation {self.expert_act!r} is not one of "
                               f"{', '.join(EXPERT_ACTS)}")
        if self.router_kind not in ROUTERS:
            raise FlexrunError(f"router {self.router_kind!r} is not one of {', '.join(ROUTERS)}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise FlexrunError(f"{self.experts_per_token} experts per token of "
                               f"{self.num_experts} is not a valid top-k")
        if self.num_heads % self.num_kv_heads:
            raise FlexrunError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                               f"num_key_value_heads ({self.num_kv_heads})")

    def attention(self, layer: int) -> AttentionOptions:
        """The attention options of decoder layer `layer` (0-based)."""
        windowed = self.sliding_window is not None and (
            self.window_layers is None or layer in self.window_layers)
        return AttentionOptions(self.query_scale, self.attn_softcap,
                                self.sliding_window if windowed else None)

    def uses_local_rope(self, layer: int | None) -> bool:
        """Whether decoder layer `layer` rotates by the local RoPE (local_rope_theta)."""
        return self.local_rope_theta is not None and layer in self.local_rope_layers

    def keeps_fp32(self, name: str) -> bool:
        """Weights held in fp32 whatever the run's dtype: a sigmoid_group router and its
        choice bias (transformers and llama.cpp keep them so; in bf16 ~2% of tokens would
        pick other experts)."""
        return self.router_kind == "sigmoid_group" and name.endswith(
            (".router.weight", ".router.correction"))

    def is_moe(self, layer: int) -> bool:
        """Whether decoder layer `layer` (0-based) has a mixture-of-experts MLP."""
        return self.num_experts > 0 and (self.moe_layers is None or layer in self.moe_layers)

    @property
    def first_moe_layer(self) -> int | None:
        """The first decoder layer with a mixture-of-experts MLP (None: a dense model)."""
        return next((j for j in range(self.num_layers) if self.is_moe(j)), None)

    @property
    def num_units(self) -> int:
        return self.num_layers + 2

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT-350m projects it to hidden_size)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ---- weight names and shapes per unit -------------------------------------------------
    def unit_shapes(self, unit: int) -> dict[str, tuple[int, ...]]:
        """Canonical weight name -> shape for one unit (tied weights appear in both units)."""
        if unit == 0:
            return self._embed_shapes()
        if unit == self.num_layers + 1:
            return self._head_shapes()
        return {f"layers.{unit - 1}.{k}": v for k, v in self._layer_shapes(unit - 1).items()}

    def all_shapes(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for u in range(self.num_units):
            out.update(self.unit_shapes(u))
        return out

    def _embed_shapes(self) -> dict[str, tuple[int, ...]]:
        s = {"embed.tokens": (self.vocab_size, self.embed_dim)}
        if self.arch == "opt":
            s["embed.positions"] = (self.max_positions + 2, self.hidden_size)
            if self.embed_dim != self.hidden_size:
                s["embed.project_in"] = (self.hidden_size, self.embed_dim)
        return s

    def _head_shapes(self) -> dict[str, tuple[int, ...]]:
        h, s = self.hidden_size, {}
        if self.arch == "opt":
            if self.final_layer_norm:
                s.update({"head.norm.weight": (h,), "head.norm.bias": (h,)})
            if self.embed_dim != h:
                s["head.project_out"] = (self.embed_dim, h)
        else:
            s["head.norm.weight"] = (h,)
        s["head.lm_head" if not self.tie_word_embeddings else "embed.tokens"] = (
            self.vocab_size, self.embed_dim)
        return s

    def _layer_shapes(self, layer: int = 0) -> dict[str, tuple[int, ...]]:
        h, q, kv, f = self.hidden_size, self.num_heads * self.head_dim, self.kv_dim, self.ffn_dim
        if self.arch == "opt":
            return {"attn_norm.weight": (h,), "attn_norm.bias": (h,),
                    "q.weight": (q, h), "q.bias": (q,), "k.weight": (kv, h), "k.bias": (kv,),
                    "v.weight": (kv, h), "v.bias": (kv,), "o.weight": (h, q), "o.bias": (h,),
                    "mlp_norm.weight": (h,), "mlp_norm.bias": (h,),
                    "fc1.weight": (f, h), "fc1.bias": (f,), "fc2.weight": (h, f), "fc2.bias": (h,)}
        s = {"attn_norm.weight": (h,), "q.weight": (q, h), "k.weight": (kv, h),
             "v.weight": (kv, h), "o.weight": (h, q), "mlp_norm.weight": (h,),
             "gate.weight": (f, h), "up.weight": (f, h), "down.weight": (h, f)}
        if not self.pre_norms:
            del s["attn_norm.weight"], s["mlp_norm.weight"]
        if self.attention_bias or self.qkv_bias:
            s.update({"q.bias": (q,), "k.bias": (kv,), "v.bias": (kv,)})
        if self.attention_bias:
            s["o.bias"] = (h,)
        if self.qk_norm:
            s.update({"q_norm.weight": (q,), "k_norm.weight": (kv,)} if self.qk_norm_whole
                     else {"q_norm.weight": (self.head_dim,), "k_norm.weight": (self.head_dim,)})
        if self.sandwich_norms:
            s.update({"post_attn_norm.weight": (h,), "post_mlp_norm.weight": (h,)})
        if self.attn_sinks:
            s["sinks"] = (self.num_heads,)
        if self.is_moe(layer):
            for n in ("gate.weight", "up.weight", "down.weight"):
                del s[n]
            s.update(self._moe_shapes())
        elif self.mlp_bias:
            s.update({"gate.bias": (f,), "up.bias": (f,), "down.bias": (h,)})
        return s

    def _moe_shapes(self) -> dict[str, tuple[int, ...]]:
        """A MoE MLP: the router, each expert's gate/up/down as tensors of their own (the
        storage layer places each expert on its tier), the shared expert and its gate."""
        h, f, E = self.hidden_size, self.expert_ffn_dim, self.num_experts
        s = {"router.weight": (E, h)}
        if self.router_bias:
            s["router.bias"] = (E,)
        if self.router_kind == "sigmoid_group":
            s["router.correction"] = (E,)
        for e in range(E):
            s.update({f"experts.{e}.gate.weight": (f, h), f"experts.{e}.up.weight": (f, h),
                      f"experts.{e}.down.weight": (h, f)})
            if self.expert_bias:
                s.update({f"experts.{e}.gate.bias": (f,), f"experts.{e}.up.bias": (f,),
                          f"experts.{e}.down.bias": (h,)})
        if self.shared_expert_ffn_dim:
            fs = self.shared_expert_ffn_dim
            s.update({"shared.gate.weight": (fs, h), "shared.up.weight": (fs, h),
                      "shared.down.weight": (h, fs)})
            if self.shared_expert_gate:
                s["shared_gate.weight"] = (1, h)
        return s

    # ---- sizes for the cost model ---------------------------------------------------------
    def num_params(self) -> int:
        n = 0
        for shape in self.all_shapes().values():
            p = 1
            for d in shape:
                p *= d
            n += p
        return n

    def layer_params(self, layer: int = 0) -> int:
        n = 0
        for shape in self._layer_shapes(layer).values():
            p = 1
            for d in shape:
                p *= d
            n += p
        return n

    def kv_bytes_per_token(self, elem_bytes: int) -> int:
        """KV cache bytes for one token over all layers."""
        return 2 * self.num_layers * self.kv_dim * elem_bytes
