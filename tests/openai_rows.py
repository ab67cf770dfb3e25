"""What the OpenAI batch tests share: request lines, user messages, the chat template."""
from __future__ import annotations

import json
from pathlib import Path

TEMPLATE = Path(__file__).parent / "data" / "chatml.jinja"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def req(cid: str, url: str = CHAT, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "opt", **body}}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
