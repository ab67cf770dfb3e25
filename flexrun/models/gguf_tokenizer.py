"""A GGUF file's tokenizer, chat template and special tokens, as llama.cpp reads them: the
embedded tokenizer.json when there is one, else a byte-level BPE built from the vocabulary and
merges with the pre-tokenizer llama.cpp names (`tokenizer.ggml.pre`)."""
from __future__ import annotations

import functools

from flexrun.models.gguf import PathLike, _meta, _reader

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "pixtral", "dbrx"}
# llama-vocab.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2 (Qwen2's tokenizer.json): single digits
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"}
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp splits each digit off first for these (as SmolLM's tokenizer.json: Digits + ByteLevel)
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# ... and GPT-2's own split for these (none: llama.cpp's "default")
_GPT2_PRE = {None, "default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion",
             "granite-docling"}


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers as pt
    if pre in _LLAMA3_PRE or pre in _QWEN2_PRE or pre == "tekken":
        split = (_LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT if pre in _QWEN2_PRE
                 else _TEKKEN_SPLIT)
        return pt.Sequence([pt.Split(Regex(split), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_PRE:
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre not in _GPT2_PRE:
        # another split (gpt-4o's, ...) would tokenize text differently, silently
        raise ValueError(f"GGUF tokenizer pre-type {pre!r} is not one flexrun rebuilds (gpt-2, "
                         "llama3, qwen2, tekken, smollm and their kin)")
    return byte_level


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def gguf_tokenizer(path: PathLike):
    """A tokenizers.Tokenizer rebuilt from the GGUF's byte-level BPE ("gpt2") vocabulary; None
    when the file holds no vocabulary (no tokenizer.ggml.model, or "none")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    r = _reader(path)
    embedded = _meta(r, "tokenizer.huggingface.json")
    if embedded:
        return Tokenizer.from_str(embedded)
    kind, pre = _meta(r, "tokenizer.ggml.model"), _meta(r, "tokenizer.ggml.pre")
    if kind in (None, "none"):
        return None
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported: flexrun rebuilds "
                         "byte-level BPE ('gpt2') tokenizers only")
    tokens: list[str] = _meta(r, "tokenizer.ggml.tokens")
    merges = _meta(r, "tokenizer.ggml.merges")
    if not merges:
        raise ValueError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    types = _meta(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    spell = _byte_alphabet()
    alphabet = set(spell.values())
    # a token spelled outside the byte alphabet (a llama.cpp mislabel) is respelled, as in HF
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     ignore_merges=pre in _LLAMA3_PRE)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == 4 and t in vocab])
    tok.post_processor = _post_processor(r, tokens, default_bos=pre in _LLAMA3_PRE)
    return tok


def _post_processor(r, tokens: list[str], default_bos: bool):
    """BOS/EOS insertion as llama.cpp does it (tokenizer.ggml.add_bos_token / add_eos_token)."""
    from tokenizers import processors
    specials = []
    for k, default in (("bos", default_bos), ("eos", False)):
        tid = _meta(r, f"tokenizer.ggml.{k}_token_id")
        on = _meta(r, f"tokenizer.ggml.add_{k}_token", default)
        specials.append((tokens[tid], int(tid)) if on and tid is not None else None)
    bos, eos = specials
    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False)
    pre, post = ([bos[0]] if bos else []), ([eos[0]] if eos else [])
    single = " ".join(pre + ["$A:0"] + post)
    pair = " ".join(pre + ["$A:0"] + post + [f"{s}:1" for s in pre] + ["$B:1"]
                    + [f"{s}:1" for s in post])
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=[s for s in specials if s])


def gguf_chat_template(path: PathLike) -> str | None:
    """The Jinja chat template stored in the GGUF (tokenizer.chat_template), if any."""
    return _meta(_reader(path), "tokenizer.chat_template") or None


_SPECIAL_TOKEN_IDS = (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))


def gguf_special_tokens(path: PathLike) -> dict[str, str]:
    """bos/eos/unk/pad token strings: tokenizer.ggml.*_token_id looked up in
    tokenizer.ggml.tokens (as transformers' GGUF tokenizer names them)."""
    r = _reader(path)
    tokens = r.fields.get("tokenizer.ggml.tokens")
    out = {}
    for name, key in _SPECIAL_TOKEN_IDS:
        tid = _meta(r, f"tokenizer.ggml.{key}")
        if tokens is not None and tid is not None and 0 <= int(tid) < len(tokens.data):
            out[name] = tokens.contents(int(tid))
    return out
