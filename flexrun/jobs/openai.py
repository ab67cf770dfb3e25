"""OpenAI Batch API files: request lines in, batch output lines out.

A request line is {"custom_id", "method": "POST", "url": "/v1/chat/completions" or
"/v1/completions", "body": {...}}. A line that cannot be served becomes an error line
({"id", "custom_id", "response": null, "error": {"code", "message"}}) and the job goes on; a
line without a readable custom_id is keyed by its line number (an integer). Only a duplicate
custom_id stops the job before it starts, since a rerun could not tell the two apart."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from flexrun.config import FlexrunError
from flexrun.jobs.fields import JobItem, LineError, chat_messages, sampling_options
from flexrun.jobs.plain import input_lines

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "n", "seed", "logprobs",
          "top_k"}                                  # top_k: not OpenAI's, as vLLM takes it
SUPPORTED = {"chat": COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
             "completions": COMMON | {"prompt"}}
IGNORED = {"user", "metadata", "store", "service_tier"}
NO_OPS = {"frequency_penalty": 0, "presence_penalty": 0, "stream": False, "logit_bias": {},
          "tools": [], "functions": [], "echo": False}  # these values change nothing
DEFAULT_MAX_TOKENS = {"chat": None, "completions": 16}  # OpenAI's; None: up to the context


def is_openai_line(line: str | None) -> bool:
    """Whether a first input line looks like an OpenAI batch request."""
    try:
        row = json.loads(line)
    except (TypeError, ValueError):
        return False
    return isinstance(row, dict) and "custom_id" in row and "body" in row


def read_openai(path: str | Path) -> list[JobItem]:
    """Every request line as a JobItem, with `error` set where the line cannot be served."""
    p = Path(path)
    items, seen = [], {}
    for no, line in input_lines(p):
        it = _request(no, line)
        key = json.dumps(it.id)
        if key in seen:
            raise FlexrunError(f"{p} line {no}: duplicate custom_id {it.id!r} (also on line "
                               f"{seen[key]}); custom_ids must be unique so a rerun can resume")
        seen[key] = no
        items.append(it)
    if not items:
        raise FlexrunError(f"input file {p} holds no requests: write one JSON object per line")
    return items


def _request(no: int, line: str | None) -> JobItem:
    if line is None:
        return JobItem(no, line=no, error=LineError(
            "invalid_encoding", f"line {no} is not valid UTF-8: re-encode the file as UTF-8"))
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return JobItem(no, line=no, error=LineError(
            "invalid_json", f"line {no}: malformed JSON ({e.msg}); each line must be one "
            '{"custom_id": ..., "method": "POST", "url": ..., "body": {...}} object'))
    cid = row.get("custom_id") if isinstance(row, dict) else None
    it = JobItem(cid if isinstance(cid, str) and cid else no, line=no)
    try:
        if not isinstance(row, dict):
            raise LineError("invalid_request", f"line {no} is not a JSON object")
        if not isinstance(cid, str) or not cid:
            raise LineError("missing_required_parameter", f'line {no}: "custom_id" must be '
                            "a non-empty string")
        _fill(it, row)
    except LineError as e:
        it.error = e
    return it


def _fill(it: JobItem, row: dict) -> None:
    if row.get("method", "POST") != "POST":
        raise LineError("invalid_method", f"method {json.dumps(row['method'])} is not "
                        'supported: use "POST"')
    body = row.get("body")
    if not isinstance(body, dict):
        raise LineError("missing_required_parameter", '"body" must be a JSON object')
    url = row.get("url")
    if url is None:
        url = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    if url not in URLS:
        raise LineError("invalid_url", f"url {json.dumps(url)} is not supported: flexrun "
                        "answers /v1/chat/completions and /v1/completions")
    it.endpoint = URLS[url]
    bad = [k for k, v in body.items() if k not in SUPPORTED[it.endpoint] and k not in IGNORED
           and v is not None and not (k in NO_OPS and v == NO_OPS[k])]
    if bad:
        names = ", ".join(f'"{k}"' for k in bad)
        raise LineError("unsupported_parameter", f"{names} {'is' if len(bad) == 1 else 'are'} "
                        f"not supported by flexrun ({url}): remove "
                        f"{'it' if len(bad) == 1 else 'them'} from the body")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise LineError("invalid_type", '"model" must be a string')
    it.model = model
    if it.endpoint == "chat":
        if "messages" not in body:
            raise LineError("missing_required_parameter", 'the body needs "messages"')
        it.messages = chat_messages(body["messages"])
    else:
        _prompt(it, body.get("prompt"))
    it.options = _options(it.endpoint, body)


def _prompt(it: JobItem, p) -> None:
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                                    # a batch of one prompt
    if isinstance(p, str) and p:
        it.prompt = p
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool)
                                           for x in p):
        it.input_ids = p
    elif p is None:
        raise LineError("missing_required_parameter", 'the body needs "prompt"')
    else:
        raise LineError("invalid_value", '"prompt" must be a non-empty string or a non-empty '
                        "list of token ids (one prompt per request line)")


def _options(endpoint: str, body: dict) -> dict:
    b = dict(body)
    if endpoint == "chat":
        if b.get("max_completion_tokens") is not None:
            b["max_tokens"] = b["max_completion_tokens"]
    else:
        k = b.pop("logprobs", None)                 # completions: logprobs k = top k as well
        if k is not None:
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 20:
                raise LineError("invalid_value", f'"logprobs" must be an integer in 0..20, '
                                f"got {json.dumps(k)}")
            b["logprobs"], b["top_logprobs"] = True, k
    if b.get("max_tokens") is None and DEFAULT_MAX_TOKENS[endpoint] is not None:
        b["max_tokens"] = DEFAULT_MAX_TOKENS[endpoint]
    for name, default in (("temperature", 1.0), ("top_p", 1.0)):   # OpenAI's defaults
        if b.get(name) is None:
            b[name] = default
    if b["top_p"] == 0:                             # only the most likely token: greedy
        b["top_p"], b["temperature"] = 1.0, 0.0
    return sampling_options(b)


# ---- output lines -----------------------------------------------------------------------------
def _hex() -> str:
    return uuid.uuid4().hex


def error_line(it: JobItem, err: LineError) -> dict:
    return {"id": f"batch_req_{_hex()}", "custom_id": it.id, "response": None,
            "error": {"code": err.code, "message": err.message}}


def response_line(it: JobItem, out, model: str, pieces) -> dict:
    """The batch output line of a request served with RequestOutput `out`."""
    chat = it.endpoint == "chat"
    choices = []
    for j, s in enumerate(out.samples):
        c = {"index": j}
        if chat:
            c["message"] = {"role": "assistant", "content": s.text, "refusal": None}
            c["logprobs"] = None if s.logprobs is None else {
                "content": [_chat_logprob(t, pieces) for t in s.logprobs], "refusal": None}
        else:
            c["text"] = s.text
            c["logprobs"] = None if s.logprobs is None else _completion_logprobs(s, pieces)
        c["finish_reason"] = s.finish_reason
        choices.append(c)
    completion = sum(len(s.output_ids) for s in out.samples)
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{_hex()}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": {"prompt_tokens": len(out.prompt_ids), "completion_tokens": completion,
                      "total_tokens": len(out.prompt_ids) + completion},
            "system_fingerprint": None}
    return {"id": f"batch_req_{_hex()}", "custom_id": it.id,
            "response": {"status_code": 200, "request_id": _hex(), "body": body},
            "error": None}


def _entry(i: int, lp: float, pieces) -> dict:
    return {"token": pieces.piece(i), "logprob": lp, "bytes": pieces.raw(i)}


def _chat_logprob(t, pieces) -> dict:
    return {**_entry(t.token_id, t.logprob, pieces),
            "top_logprobs": [_entry(i, lp, pieces) for i, lp in t.top]}


def _completion_logprobs(s, pieces) -> dict:
    tokens = [pieces.piece(t.token_id) for t in s.logprobs]
    offsets, at = [], 0
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in s.logprobs],
            "top_logprobs": [{pieces.piece(i): lp for i, lp in t.top} for t in s.logprobs],
            "text_offset": offsets}
