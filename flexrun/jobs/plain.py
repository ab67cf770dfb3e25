"""Plain JSONL jobs: {"id", "prompt" | "input_ids" | "messages", per-row sampling fields}.
Any bad line stops the job before the model loads, with one error naming the line and the fix.
Output lines: {"id", "output_ids", "text", "finish_reason"}, plus "logprobs" and "samples"
where the row asked for them."""
from __future__ import annotations

import json
from pathlib import Path

from flexrun.config import FlexrunError
from flexrun.jobs.fields import JobItem, LineError, chat_messages, sampling_options

SHAPE = ('{"id": ..., "prompt": "..."}, {"id": ..., "input_ids": [...]} or '
         '{"id": ..., "messages": [{"role": "user", "content": "..."}]}')


def input_lines(p: Path):
    """(line number, text) of each non-blank line; text is None where it is not UTF-8."""
    if not p.is_file():
        raise FlexrunError(f"input file {p} not found")
    with open(p, "rb") as f:
        for no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield no, None
                continue
            if line.strip():
                yield no, line


def read_input(path: str | Path) -> list[JobItem]:
    """Parse the input JSONL; any bad line is an error naming the line and the fix."""
    p = Path(path)
    items, seen = [], set()
    for no, line in input_lines(p):
        if line is None:
            raise FlexrunError(f"{p} line {no}: not valid UTF-8; re-encode the file as UTF-8")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FlexrunError(f"{p} line {no}: malformed JSON ({e.msg}); each line must be "
                               f"{SHAPE}")
        items.append(row_item(row, p, no))
        key = json.dumps(items[-1].id)
        if key in seen:
            raise FlexrunError(f"{p} line {no}: duplicate id {items[-1].id!r}; ids must be "
                               "unique so a rerun can resume")
        seen.add(key)
    if not items:
        raise FlexrunError(f"input file {p} holds no prompts: write one JSON object per line")
    return items


def row_item(row, p: Path | str, no: int) -> JobItem:
    """One plain row (a line's parsed JSON) as a JobItem, checked as read_input checks a
    line; a bad row raises FlexrunError naming `p` (the file, or where the row came from)
    and line `no`."""
    if not isinstance(row, dict) or "id" not in row:
        raise FlexrunError(f'{p} line {no}: each line needs an "id" and a "prompt", '
                           '"input_ids" or "messages"')
    rid = row["id"]
    try:
        options = sampling_options(row)
    except LineError as e:
        raise FlexrunError(f"{p} line {no}: id {rid!r}: {e.message}") from None
    item = JobItem(rid, options=options, line=no)
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise FlexrunError(f"{p} line {no}: prompt of id {rid!r} must be a string")
        if not row["prompt"]:
            raise FlexrunError(f"{p} line {no}: prompt of id {rid!r} is empty: give it "
                               "some text or remove the line")
        item.prompt = row["prompt"]
        return item
    if "messages" in row:
        try:
            item.messages = chat_messages(row["messages"])
        except LineError as e:
            raise FlexrunError(f"{p} line {no}: id {rid!r}: {e.message}") from None
        return item
    ids = row.get("input_ids")
    if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                            for x in ids):
        raise FlexrunError(f'{p} line {no}: id {rid!r} needs "prompt" (text), '
                           '"input_ids" (a list of integers) or "messages" (a chat)')
    if not ids:
        raise FlexrunError(f"{p} line {no}: input_ids of id {rid!r} is empty: give at "
                           "least one token id or remove the line")
    item.input_ids = ids
    return item


def plain_line(item: JobItem, out, piece) -> dict:
    """The output line of `item` from its RequestOutput; piece(id) is a token's text."""
    row = {"id": item.id, "output_ids": out.output_ids, "text": out.text,
           "finish_reason": out.finish_reason}
    samples = [_sample(s, piece) for s in out.samples]
    if "logprobs" in samples[0]:
        row["logprobs"] = samples[0]["logprobs"]
    if len(samples) > 1:
        row["samples"] = samples
    if out.prompt_logprobs is not None:
        row["prompt_logprobs"] = [None if t is None else _entry(t, piece)
                                  for t in out.prompt_logprobs]
    return row


def _entry(t, piece) -> dict:
    return {"token_id": t.token_id, "token": piece(t.token_id), "logprob": t.logprob,
            "top_logprobs": [{"token_id": i, "token": piece(i), "logprob": lp}
                             for i, lp in t.top]}


def _sample(s, piece) -> dict:
    d = {"output_ids": s.output_ids, "text": s.text, "finish_reason": s.finish_reason}
    if s.logprobs is not None:
        d["logprobs"] = [_entry(t, piece) for t in s.logprobs]
    return d
