"""Token ids as the text and bytes that logprobs report."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_level_inverse() -> dict[str, int]:
    """GPT-2's byte-level alphabet (bytes_to_unicode), char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Pieces:
    """piece(id): the tokenizer's decoded text of one id (special tokens shown);
    raw(id): its bytes: for a byte-level BPE vocabulary the token's own bytes (a piece of a
    multi-byte character included), else the UTF-8 of its text. Without a tokenizer the
    text is empty."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._text: dict[int, str] = {}
        dec = getattr(tokenizer, "decoder", None)
        self.byte_level = type(dec).__name__ == "ByteLevel"

    def piece(self, i: int) -> str:
        s = self._text.get(i)
        if s is None:
            s = "" if self.tok is None else self.tok.decode([i], skip_special_tokens=False)
            self._text[i] = s
        return s

    def raw(self, i: int) -> list[int]:
        if self.byte_level:
            tok = self.tok.id_to_token(i)
            inv = _byte_level_inverse()
            if tok is not None and all(c in inv for c in tok):
                return [inv[c] for c in tok]
        return list(self.piece(i).encode("utf-8"))
