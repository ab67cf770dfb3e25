"""HF config.json -> ModelSpec for every family flexrun runs (FAMILIES in spec.py)."""
from __future__ import annotations

from flexrun.config import FlexrunError
from flexrun.models.spec import FAMILIES, ModelSpec


def eos_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def rope_params(cfg: dict) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling from either the transformers 4.x or 5.x config style
    (Phi-3 keeps original_max_position_embeddings at the config's top level)."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    if scaling is not None and "original_max_position_embeddings" not in scaling \
            and cfg.get("original_max_position_embeddings"):
        scaling = {**scaling,
                   "original_max_position_embeddings": cfg["original_max_position_embeddings"]}
    return float(theta), scaling


def rotary_dim(cfg: dict, head_dim: int, default: float = 1.0) -> int | None:
    """The leading dims of each head that RoPE rotates (partial_rotary_factor at the config's
    top level or in its rope parameters: Phi-4-mini, GLM-4.5); None: all of them."""
    params = cfg.get("rope_parameters") or {}
    params = params.get("full_attention", params)
    frac = cfg.get("partial_rotary_factor", params.get("partial_rotary_factor"))
    if frac is None and isinstance(cfg.get("rope_scaling"), dict):
        frac = cfg["rope_scaling"].get("partial_rotary_factor")
    frac = default if frac is None else frac
    if float(frac) == 1.0:
        return None
    dim = int(head_dim * float(frac))
    if dim <= 0 or dim % 2:
        raise FlexrunError(f"partial_rotary_factor {frac} rotates {dim} of {head_dim} head "
                           "dims: it must be an even number above 0")
    return dim


# Gemma3TextConfig's defaults: Hub configs of the multimodal 4B / 12B / 27B leave most out
_GEMMA3_TEXT = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
                    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                    head_dim=256, hidden_activation="gelu_pytorch_tanh",
                    max_position_embeddings=131_072, rms_norm_eps=1e-6, pad_token_id=0,
                    eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
                    query_pre_attn_scalar=256, sliding_window=4096)


def gemma3_text_config(cfg: dict) -> dict:
    """A Gemma-3 text decoder's config with Gemma3TextConfig's defaults filled in."""
    if cfg.get("use_bidirectional_attention"):
        raise FlexrunError("Gemma-3 with use_bidirectional_attention (an embedding model) is "
                           "not a generator: flexrun runs causal decoders only")
    return {**_GEMMA3_TEXT, **cfg}


def _llama4(cfg: dict) -> dict:
    """Llama 4's MoE and attention fields (Llama4TextConfig's defaults): MoE layers every
    interleave_moe_layer_step-th (dense ones of intermediate_size_mlp), top-k experts of
    intermediate_size with a sigmoid of their logits scaling their inputs, an ungated shared
    expert; no RoPE on every 4th layer, q/k L2-normed after RoPE on the others. Its chunked
    attention (attention_chunk_size) and its query temperature on the NoPE layers (floor_scale)
    change nothing before position 8192: the positions stop there."""
    n, step = cfg["num_hidden_layers"], int(cfg.get("interleave_moe_layer_step", 1) or 1)
    layers = cfg.get("moe_layers")
    layers = tuple(range(step - 1, n, step)) if layers is None else tuple(layers)
    f = cfg["intermediate_size"]
    limit = min(x for x in (cfg.get("max_position_embeddings", 4096 * 32),
                            cfg.get("attention_chunk_size", 8192) or 1 << 40,
                            cfg.get("floor_scale", 8192) if cfg.get("attn_temperature_tuning",
                                                                      True) else 1 << 40))
    return dict(num_experts=cfg.get("num_local_experts", 16),
                experts_per_token=cfg.get("num_experts_per_tok", 1), expert_ffn_dim=f,
                shared_expert_ffn_dim=f, shared_expert_gate=False, router_kind="sigmoid_topk",
                expert_input_scaled=True, moe_layers=layers if len(layers) < n else None,
                ffn_dim=cfg.get("intermediate_size_mlp", 16384), max_positions=limit,
                nope_layers=_nope_layers(cfg, empty_is_default=True), rope_fp32=True,
                qk_l2_norm=bool(cfg.get("use_qk_norm", True)))


def _llama4_scaling(cfg: dict) -> tuple[float, int] | None:
    """Ministral 3's query scaling over long contexts: (llama_4_scaling_beta, the rope's
    original_max_position_embeddings) from its rope parameters; None without a beta."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    beta = params.get("llama_4_scaling_beta")
    if not beta:
        return None
    return float(beta), int(params.get("original_max_position_embeddings")
                            or cfg["max_position_embeddings"])


def _layer_type_rope(cfg: dict, mt: str) -> tuple[float, dict | None, float, dict | None]:
    """(theta, rope_scaling) of the full-attention layers and of the sliding ones, for the
    families that rotate them apart (Gemma-3, OLMo-3): transformers 5's rope_parameters per
    layer type, or 4.x's rope_theta / rope_scaling (full layers) / rope_local_base_freq."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:
        theta, scaling = rope_params({"rope_parameters": params["full_attention"]})
        local = params.get("sliding_attention") or params["full_attention"]
        local_theta, local_scaling = rope_params({"rope_parameters": local})
        return theta, scaling, local_theta, local_scaling
    default = 1_000_000.0 if mt == "gemma3_text" else 500_000.0
    theta, scaling = rope_params({**cfg, "rope_theta": cfg.get("rope_theta", default)})
    if mt == "gemma3_text":     # 4.x: the sliding layers unscaled at rope_local_base_freq
        return theta, scaling, float(cfg.get("rope_local_base_freq", 10_000.0)), None
    # Olmo3Config given rope_theta / rope_scaling: both go to the full-attention layers, the
    # sliding ones keep its default theta, unscaled
    return theta, scaling, 500_000.0, None


def _sliding_types(cfg: dict, mt: str) -> tuple[int, ...] | None:
    """The layers of type sliding_attention (layer_types, or Gemma-3's pattern), None when
    the config names no types."""
    n, types = cfg["num_hidden_layers"], cfg.get("layer_types")
    if types:
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if mt == "gemma3_text":             # every sliding_window_pattern-th layer is global
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        return tuple(i for i in range(n) if (i + 1) % pattern)
    if mt == "smollm3":                 # SmolLM3Config: its NoPE layers slide
        return _nope_layers(cfg)
    if mt == "olmo3":                   # Olmo3Config: every 4th layer is global
        return tuple(i for i in range(n) if (i + 1) % 4)
    if mt == "exaone4":                 # Exaone4Config: every sliding_window_pattern-th global,
        pattern = cfg.get("sliding_window_pattern") or 4   # or a string of L (local) / G
        if cfg.get("sliding_window") is None:
            return ()
        if isinstance(pattern, str):
            return tuple(i for i in range(n) if pattern[i % len(pattern)] == "L")
        return tuple(i for i in range(n) if (i + 1) % int(pattern))
    if mt == "gpt_oss":                 # GptOssConfig: sliding and full layers alternate
        return tuple(range(0, n, 2))
    return None


def _nope_layers(cfg: dict, empty_is_default: bool = False) -> tuple[int, ...]:
    """SmolLM3's and Llama 4's layers without RoPE: no_rope_layers (1: rotated), else every
    no_rope_layer_interval-th layer (Llama4TextConfig takes an empty list for none given, as
    the Hub's Scout and Maverick configs hold)."""
    n, flags = cfg["num_hidden_layers"], cfg.get("no_rope_layers")
    if flags is None or (empty_is_default and not flags):
        every = int(cfg.get("no_rope_layer_interval") or 4)
        flags = [int((i + 1) % every != 0) for i in range(n)]
    return tuple(i for i, rotated in enumerate(flags) if not rotated)


def _global_layers(cfg: dict, windowed: tuple[int, ...] | None) -> tuple[int, ...]:
    """The layers outside `windowed` (EXAONE 4's NoPE layers: its full-attention ones)."""
    return tuple(i for i in range(cfg["num_hidden_layers"]) if i not in (windowed or ()))


def _windowed_layers(cfg: dict, mt: str) -> tuple[int | None, tuple[int, ...] | None]:
    """(sliding_window, the layers it applies to; None: all) as transformers reads them."""
    n, window = cfg["num_hidden_layers"], cfg.get("sliding_window")
    qwen = mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "smollm3")
    if qwen and not cfg.get("use_sliding_window", False):
        return None, None
    if not window or mt in ("llama", "opt"):
        return None, None
    layers = _sliding_types(cfg, mt)
    if layers is not None:
        return (int(window), layers) if layers else (None, None)
    if mt == "gemma2":                  # even layers slide (Gemma2DecoderLayer before layer_types)
        return int(window), tuple(range(0, n, 2))
    if mt in ("qwen2", "qwen3"):
        first = cfg.get("max_window_layers", n)
        layers = tuple(range(first, n))
        return (int(window), layers) if layers else (None, None)
    if mt == "qwen2_moe":               # Qwen2MoeConfig's layer_types when it has none
        last = cfg.get("max_window_layers", 28)
        layers = tuple(i for i in range(n) if (i + 1) % 2 and i < last)
        return (int(window), layers) if layers else (None, None)
    return int(window), None            # mistral, mixtral, phi3, qwen3_moe: every layer


def _opt(cfg: dict, name: str) -> ModelSpec:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    proj = cfg.get("word_embed_proj_dim") or h
    pre = cfg.get("do_layer_norm_before", True)
    return ModelSpec(
        arch="opt", family="opt", vocab_size=cfg["vocab_size"], hidden_size=h,
        num_layers=cfg["num_hidden_layers"], num_heads=heads, num_kv_heads=heads,
        head_dim=h // heads, ffn_dim=cfg["ffn_dim"],
        max_positions=cfg["max_position_embeddings"], norm_eps=1e-5,
        do_layer_norm_before=pre, word_embed_proj_dim=proj if proj != h else None,
        final_layer_norm=pre and not cfg.get("_remove_final_layer_norm", False),
        tie_word_embeddings=True, bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_list(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"), name=name)


def _act(cfg: dict) -> str:
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act in ("silu", "swish"):
        return "silu"
    if act in ("gelu_pytorch_tanh", "gelu_tanh"):
        return "gelu_tanh"
    raise FlexrunError(f"hidden activation {act!r} is not supported (silu, gelu_pytorch_tanh)")


def _moe(cfg: dict, mt: str) -> dict:
    """The MoE fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config (defaults: transformers')."""
    if mt == "mixtral":
        return dict(num_experts=cfg.get("num_local_experts", 8),
                    experts_per_token=cfg.get("num_experts_per_tok", 2),
                    expert_ffn_dim=cfg["intermediate_size"], router_kind="topk_softmax")
    if mt == "gpt_oss":     # GptOssConfig's defaults
        return dict(num_experts=cfg.get("num_local_experts", 128),
                    experts_per_token=cfg.get("num_experts_per_tok", 4),
                    expert_ffn_dim=cfg["intermediate_size"], router_kind="topk_softmax",
                    router_bias=True, expert_bias=True, expert_act="swiglu_clamp",
                    swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
                    swiglu_limit=float(cfg.get("swiglu_limit", 7.0)))
    if mt == "glm4_moe":    # Glm4MoeConfig's defaults; its first layers keep a dense MLP
        n, shared = cfg["num_hidden_layers"], int(cfg.get("n_shared_experts", 1) or 0)
        f = cfg.get("moe_intermediate_size", 1408)
        return dict(num_experts=cfg.get("n_routed_experts", 128),
                    experts_per_token=cfg.get("num_experts_per_tok", 8), expert_ffn_dim=f,
                    shared_expert_ffn_dim=f * shared, shared_expert_gate=False,
                    router_kind="sigmoid_group", n_group=cfg.get("n_group", 1),
                    topk_group=cfg.get("topk_group", 1),
                    routed_scaling=float(cfg.get("routed_scaling_factor", 1.0)),
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                    moe_layers=tuple(range(cfg.get("first_k_dense_replace", 1), n)))
    if mt == "olmoe":       # OlmoeConfig's defaults: softmax over all, top-k, not renormalised
        return dict(num_experts=cfg.get("num_experts", 64),
                    experts_per_token=cfg.get("num_experts_per_tok", 8),
                    expert_ffn_dim=cfg["intermediate_size"], router_kind="softmax_topk",
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", False)))
    if mt not in ("qwen2_moe", "qwen3_moe"):
        return {}
    qwen2 = mt == "qwen2_moe"
    n, E = cfg["num_hidden_layers"], cfg.get("num_experts", cfg.get("num_local_experts"))
    E = (60 if qwen2 else 128) if E is None else int(E)
    step, dense = cfg.get("decoder_sparse_step") or 1, set(cfg.get("mlp_only_layers") or ())
    # Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: a sparse MLP where this holds, else dense
    layers = tuple(i for i in range(n) if i not in dense and E > 0 and (i + 1) % step == 0)
    if not layers:
        return {}
    return dict(num_experts=E, experts_per_token=cfg.get("num_experts_per_tok", 4 if qwen2 else 8),
                expert_ffn_dim=cfg.get("moe_intermediate_size", 1408 if qwen2 else 768),
                shared_expert_ffn_dim=cfg.get("shared_expert_intermediate_size", 5632)
                if qwen2 else 0, norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                router_kind="softmax_topk", moe_layers=None if len(layers) == n else layers)


def _llama_style(cfg: dict, mt: str, name: str) -> ModelSpec:
    if mt == "llama4":                  # (a multimodal config without a text_config)
        mt = "llama4_text"
    if mt == "exaone4":                 # Exaone4Config's window when the file has none
        cfg = {"sliding_window": 4096, **cfg}
    gemma3, olmo = mt in ("gemma3", "gemma3_text"), mt in ("olmo2", "olmo3")
    qk_whole = olmo or mt == "olmoe"
    gpt_oss, glm, granite = mt == "gpt_oss", mt == "glm4_moe", mt == "granite"
    seed = mt == "seed_oss"     # q/k/v biases by attention_bias, o's by attention_out_bias
    exaone = mt == "exaone4"    # OLMo-2's post-norms with per-head q/k norms, NoPE global layers
    if gemma3:
        cfg, mt = gemma3_text_config(cfg), "gemma3_text"
    if mt in ("gemma3_text", "olmo3"):      # the sliding layers rotate by a rope of their own
        theta, scaling, local_theta, local_scaling = _layer_type_rope(cfg, mt)
    else:
        (theta, scaling), local_theta, local_scaling = rope_params(cfg), None, None
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    window, layers = _windowed_layers(cfg, mt)
    gemma = mt in ("gemma2", "gemma3_text")
    extra = _llama4(cfg) if mt == "llama4_text" else _moe(cfg, mt)
    return ModelSpec(**{**dict(
        arch="llama", family="gemma3" if gemma3 else "llama4" if extra.get(
            "expert_input_scaled") else mt, vocab_size=cfg["vocab_size"],
        hidden_size=h, num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim, rotary_dim=rotary_dim(cfg, head_dim, 0.5 if glm else 1.0),
        ffn_dim=cfg["intermediate_size"],
        max_positions=cfg.get("max_position_embeddings", 4096),
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        attention_bias=cfg.get("attention_out_bias", False) if seed else
        cfg.get("attention_bias", False) and not glm,
        mlp_bias=cfg.get("mlp_bias", False),
        tie_word_embeddings=cfg.get("tie_word_embeddings", gemma),
        qkv_bias=mt == "qwen2" or (mt == "qwen2_moe" and cfg.get("qkv_bias", True))
        or (glm and cfg.get("attention_bias", False)) or (seed and cfg.get("attention_bias", True)),
        query_pos_scale=_llama4_scaling(cfg) if mt == "ministral3" else None,
        qk_norm=mt in ("qwen3", "qwen3_moe", "gemma3_text", "exaone4") or qk_whole
        or (glm and cfg.get("use_qk_norm", False)), qk_norm_whole=qk_whole,
        clip_qkv=cfg.get("clip_qkv") if mt == "olmoe" else None,
        pre_norms=not (olmo or exaone), norm_fp32_scale=olmo or gpt_oss, attn_sinks=gpt_oss,
        mlp_act=_act(cfg),
        norm_offset=1.0 if gemma else 0.0, sandwich_norms=gemma or olmo or exaone,
        embed_scale=gemma,
        query_scale=cfg["query_pre_attn_scalar"] ** -0.5 if gemma else
        float(cfg.get("attention_multiplier", 1.0)) if granite else None,
        embed_multiplier=float(cfg.get("embedding_multiplier", 1.0)) if granite else 1.0,
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)) if granite else 1.0,
        logits_divisor=float(cfg.get("logits_scaling", 1.0)) if granite else 1.0,
        attn_softcap=cfg.get("attn_logit_softcapping") if gemma else None,
        final_softcap=cfg.get("final_logit_softcapping") if gemma else None,
        sliding_window=window, window_layers=layers, local_rope_theta=local_theta,
        local_rope_scaling=local_scaling,
        local_rope_layers=(_sliding_types(cfg, mt) or ()) if local_theta is not None else (),
        nope_layers=_nope_layers(cfg) if mt == "smollm3" else
        _global_layers(cfg, layers) if exaone and cfg["sliding_window"] is not None else (),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_list(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"), name=name), **extra})


# image-text checkpoints whose language model is a family flexrun runs (its text_config, of
# this model_type unless it names one): only the decoder is loaded (the vision tower and
# projector are not; prompts are text); a text_config saved by transformers 4.x holds only
# what differs from its class's defaults
WRAPPERS = {"mistral3": "mistral", "llava": "llama", "llava_next": "llama",
            "gemma3": "gemma3_text", "llama4": "llama4_text"}
_TEXT_DEFAULTS = {      # LlamaConfig's and MistralConfig's (transformers 5.25)
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=131072, rms_norm_eps=1e-6, sliding_window=4096,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)}


def spec_from_config(cfg: dict, name: str = "") -> ModelSpec:
    """Build a ModelSpec from an HF config.json dict."""
    mt = cfg.get("model_type", "")
    if mt in WRAPPERS and isinstance(cfg.get("text_config"), dict):
        top = {k: cfg[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id") if k in cfg}
        text = {"model_type": WRAPPERS[mt], **cfg["text_config"]}
        cfg = {**_TEXT_DEFAULTS.get(text["model_type"], {}), **top, **text}
        mt = cfg["model_type"]
    try:
        if mt == "opt":
            return _opt(cfg, name)
        if mt in FAMILIES:
            return _llama_style(cfg, mt, name)
    except KeyError as e:
        raise FlexrunError(f"config of {name or 'model'} lacks key {e.args[0]!r}")
    arch = (cfg.get("architectures") or [mt or "unknown"])[0]
    raise FlexrunError(f"unsupported architecture {arch!r} (model_type {mt!r}) in {name}: "
                       f"flexrun runs {', '.join(sorted(FAMILIES))} models")
