"""Job items -> requests for the loaded model: prompt (text or ids), SamplingParams and a cap
on new tokens each; then calls of LLM.iter_generate that fit the model's positions.

`llm` is anything with .spec (max_positions, vocab_size, name), .tokenizer and
.chat_prompt_ids(messages, chat_template=None) (an LLM, or a fake in tests)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

from flexrun.config import FlexrunError, SamplingParams
from flexrun.jobs.fields import JobItem, LineError, derived_seed

PLAIN_MAX_NEW_TOKENS = 32           # a plain row's cap when neither it nor the command sets one


@dataclass
class Request:
    item: JobItem
    prompt: str | list[int]         # text (plain "prompt" rows) or token ids
    params: SamplingParams          # params.max_tokens == cap
    cap: int                        # new tokens at most
    length: int | None = None       # prompt tokens, when known (ids)


def plain_request(it: JobItem, llm, defaults: dict, max_new_tokens: int | None,
                  job_seed: int | None, chat_template: str | None) -> Request:
    """A plain row: its fields over the command line's (`defaults`: SamplingParams fields);
    a bad chat is a FlexrunError naming the row."""
    opts = dict(it.options)
    cap = opts.pop("max_tokens", None) or max_new_tokens or PLAIN_MAX_NEW_TOKENS
    prompt = it.value
    if it.messages is not None:
        try:
            prompt = llm.chat_prompt_ids(it.messages, chat_template=chat_template)
        except FlexrunError as e:
            raise FlexrunError(f"line {it.line}: chat of id {it.id!r}: {e}") from None
    seed = opts.pop("seed", None)
    seed = seed if seed is not None else derived_seed(job_seed, it.id)
    params = SamplingParams(**{**defaults, **opts, "seed": seed, "max_tokens": cap})
    return Request(it, prompt, params, cap, None if isinstance(prompt, str) else len(prompt))


def openai_request(it: JobItem, llm, names: set[str], max_new_tokens: int | None,
                   job_seed: int | None, chat_template: str | None, truncate: bool,
                   ignore_eos: bool = False) -> Request:
    """An OpenAI request line; anything that keeps it from running raises LineError.
    Omitted fields take OpenAI's defaults (set when the line was read), not the command
    line's; max_new_tokens (--max-new-tokens) caps max_tokens."""
    if it.model is not None and not model_matches(it.model, names):
        raise LineError("model_not_found", f"model {it.model!r} is not the loaded model "
                        f"({', '.join(sorted(names))}): send it to a job of that model or "
                        "change the request's model")
    ids = _prompt_ids(it, llm, chat_template)
    opts = dict(it.options)
    limit, L = llm.spec.max_positions, len(ids)
    asked = opts.pop("max_tokens", None)
    if asked is None:                               # OpenAI: up to the context
        cap = limit - L if max_new_tokens is None else min(max_new_tokens, limit - L)
        if cap < 1 and truncate and max_new_tokens is not None:
            cap = max_new_tokens
    else:
        cap = asked if max_new_tokens is None else min(asked, max_new_tokens)
    if cap < 1 or L + cap > limit:
        if truncate and 1 <= cap < limit:
            ids = ids[L + cap - limit:]
        else:
            raise LineError("context_length_exceeded", f"the prompt has {L} tokens; with "
                            f"max_tokens {max(cap, 1)} that exceeds the model's {limit} "
                            "positions: shorten it, lower max_tokens or run with --truncate left")
    seed = opts.pop("seed", None)
    seed = seed if seed is not None else derived_seed(job_seed, it.id)
    params = SamplingParams(**{**opts, "seed": seed, "max_tokens": cap,
                               "ignore_eos": ignore_eos})
    return Request(it, ids, params, cap, len(ids))


def _prompt_ids(it: JobItem, llm, chat_template: str | None) -> list[int]:
    if it.messages is not None:
        try:
            ids = llm.chat_prompt_ids(it.messages, chat_template=chat_template)
        except FlexrunError as e:
            raise LineError("invalid_value", f"the chat template failed on these messages: "
                            f"{e}") from None
    elif it.prompt is not None:
        if llm.tokenizer is None:
            raise LineError("invalid_value", "the prompt is text but the model has no "
                            "tokenizer: send token ids as the prompt")
        ids = llm.tokenizer.encode(it.prompt).ids
    else:
        ids = list(it.input_ids)
    vocab = llm.spec.vocab_size
    bad = [x for x in ids if not 0 <= x < vocab]
    if bad:
        raise LineError("invalid_value", f"token id {bad[0]} is outside the vocabulary "
                        f"(0..{vocab - 1})")
    if not ids:
        raise LineError("invalid_value", "the prompt is empty")
    return ids


_QUANT = re.compile(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16)$", re.IGNORECASE)


def _forms(name: str) -> set[str]:
    """A model name, its last path component, and that without .gguf / a quantization tag."""
    base = PurePath(name.rstrip("/")).name or name
    out = {name.casefold(), base.casefold()}
    if base.lower().endswith(".gguf"):
        base = base[:-5]
        out.add(base.casefold())
    out.add(_QUANT.sub("", base).casefold())
    return out


def model_names(model_arg: str, checkpoint_name: str) -> set[str]:
    """What a request's "model" may say: the --model argument and the checkpoint's file or
    directory name, as given, by last path component, without .gguf and a quant tag."""
    return _forms(model_arg) | _forms(checkpoint_name)


def model_matches(model: str, names: set[str]) -> bool:
    """model names the loaded one: it or its last path component is one of `names`
    (case-insensitive)."""
    return bool(_forms(model) & names) if model else True


def calls(reqs: list[Request], limit: int) -> list[tuple[int, list[Request]]]:
    """Group requests into iter_generate calls (max_new_tokens, requests): every request's
    cap <= the call's, and its prompt + the call's max_new_tokens fit the positions (the
    call checks that); prompts of unknown length go to the call of their own cap."""
    groups: list[tuple[int, list[Request]]] = []
    for r in sorted(reqs, key=lambda r: -r.cap):
        for m, members in groups:
            fits = r.cap == m if r.length is None else r.length + m <= limit
            if fits:
                members.append(r)
                break
        else:
            groups.append((r.cap, [r]))
    for _, members in groups:
        members.sort(key=lambda r: r.item.line)
    return groups
