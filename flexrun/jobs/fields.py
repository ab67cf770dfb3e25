"""What both input formats share: the job item, the checks of per-request sampling fields and
chat messages, and the seed a request gets when it names none."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from flexrun.config import FlexrunError, SamplingParams
from flexrun.models.chat import check_messages


class LineError(Exception):
    """One input line's problem: an OpenAI-style error code and a message naming the fix."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class JobItem:
    """One input line. `id` is its resume key: "id" (plain) or "custom_id" (openai; the line
    number, an int, when the line has no readable custom_id)."""
    id: object
    prompt: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict] | None = None
    options: dict = field(default_factory=dict)  # SamplingParams fields the line sets
    line: int = 0
    error: LineError | None = None               # openai: the line fails with this
    endpoint: str = ""                           # openai: "chat" or "completions"
    model: str | None = None                     # openai: the body's model

    @property
    def value(self):
        """What the line asks to continue: text, token ids, or chat messages."""
        if self.prompt is not None:
            return self.prompt
        return self.messages if self.messages is not None else self.input_ids


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# field -> (check, what it must be)
KINDS = {
    "max_tokens": (_int, "an integer >= 1"),
    "temperature": (_number, "a number >= 0"),
    "top_p": (_number, "a number in (0, 1]"),
    "top_k": (_int, "an integer >= 0"),
    "seed": (_int, "an integer"),
    "n": (_int, "an integer >= 1"),
    "logprobs": (lambda v: isinstance(v, bool), "true or false"),
    "top_logprobs": (_int, f"an integer in 0..{SamplingParams.MAX_TOP}"),
    "prompt_logprobs": (_int, f"an integer in 0..{SamplingParams.MAX_TOP}"),
    "stop": (lambda v: isinstance(v, str) or (isinstance(v, list)
                                             and all(isinstance(s, str) for s in v)),
             f"a string or a list of up to {SamplingParams.MAX_STOP} strings"),
}
FIELDS = tuple(KINDS)


def sampling_options(row: dict, names=FIELDS) -> dict:
    """The sampling fields `row` sets (null counts as unset), type- and range-checked the way
    SamplingParams checks them; a bad one raises LineError naming it."""
    out = {}
    for name in names:
        v = row.get(name)
        if v is None:
            continue
        check, what = KINDS[name]
        if not check(v):
            raise LineError("invalid_type", f'"{name}" must be {what}, got {json.dumps(v)}')
        out[name] = [v] if name == "stop" and isinstance(v, str) else v
    check_options(out)
    return out


def check_options(options: dict) -> SamplingParams:
    try:
        return SamplingParams(**options)
    except FlexrunError as e:
        raise LineError("invalid_value", str(e)) from None


def chat_messages(v) -> list[dict]:
    """Chat messages checked as the chat template will need them (models.chat.check_messages:
    a role, and content that is a string or text parts); "developer" (OpenAI's newer name
    for system) is rendered as "system". A problem raises LineError."""
    try:
        msgs = check_messages(v)
    except FlexrunError as e:
        raise LineError("invalid_value", f"messages: {e}") from None
    return [{**m, "role": "system"} if m["role"] == "developer" else m for m in msgs]


def derived_seed(job_seed: int | None, key: object) -> int | None:
    """The seed of a request that names none: from the job's --seed and the request's key
    (id / custom_id), so a resumed job draws the same samples; None without --seed."""
    if job_seed is None:
        return None
    h = hashlib.sha256(f"{job_seed}:{json.dumps(key)}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1
