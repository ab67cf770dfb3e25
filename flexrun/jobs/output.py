"""The output file of a job: resume from it (ids already done, a torn last line cut off),
append one complete line per result, and put it in the input's order once the job is done.

A line's key is its "custom_id" (OpenAI batch lines) or else its "id" (plain lines)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from flexrun.config import FlexrunError


def line_key(row) -> str:
    """The resume key of an output (or input) row: its custom_id, else its id, as JSON."""
    return json.dumps(row["custom_id"] if "custom_id" in row else row["id"])


def finished_ids(path: str | Path) -> set[str]:
    """Ids already complete in the output; a torn last line (from a kill) is cut off."""
    p = Path(path)
    check_output_path(p)
    if not p.exists():
        return set()
    done = set()
    try:
        with open(p, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):        # partial line from an interrupted write
                f.truncate(end)
    except OSError as e:
        raise FlexrunError(f"cannot open output file {p} ({e.strerror}): pass a writable "
                           "--output") from None
    for no, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(line_key(json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise FlexrunError(f"output file {p} line {no} is not a flexrun result: pass "
                               "another --output or remove that file")
    return done


def check_output_path(p: Path) -> None:
    """Fail early (before loading a model) on an --output that can never be written."""
    if p.is_dir():
        raise FlexrunError(f"output {p} is a directory: pass a file path as --output")
    if not p.parent.is_dir():
        raise FlexrunError(f"output directory {p.parent} does not exist: create it or pass "
                           "another --output")


class OutputWriter:
    """Appends one complete JSON line per result; `sync()` makes them durable."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_output_path(self.path)
        try:
            self.f = open(self.path, "ab")
        except OSError as e:
            raise self._error(e) from None

    def write(self, row: dict) -> None:
        try:
            self.f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        except OSError as e:
            raise self._error(e) from None

    def sync(self) -> None:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            raise self._error(e) from None

    def _error(self, e: OSError) -> FlexrunError:
        return FlexrunError(f"cannot write output file {self.path} ({e.strerror}): free space "
                            "or pass another --output; finished lines are kept")

    def close(self) -> None:
        if not self.f.closed:
            try:
                self.sync()
            finally:
                self.f.close()


def order_output(path: str | Path, items: list) -> bool:
    """Rewrite a finished job's output with its lines in the input's order; lines of ids that
    are not in the input keep their relative order after them. The lines' bytes are unchanged.
    The new file is written beside the old one, fsynced and renamed over it (then the directory
    is fsynced), so a crash leaves either file whole. A file already in order is not touched.
    Returns whether it was rewritten."""
    p = Path(os.path.realpath(path))                # a symlinked --output stays a symlink
    try:
        data = p.read_bytes()
        mode = stat.S_IMODE(p.stat().st_mode)
    except OSError as e:
        raise _order_error(p, e) from None
    body, tail = data[:data.rfind(b"\n") + 1], data[data.rfind(b"\n") + 1:]
    rank = {json.dumps(it.id): i for i, it in enumerate(items)}
    lines = [ln for ln in body.splitlines(keepends=True) if ln.strip()]
    keys = [rank.get(_line_id(ln), len(items)) for ln in lines]
    order = sorted(range(len(lines)), key=lambda i: keys[i])     # stable
    new = b"".join(lines[i] for i in order) + tail
    if new == data:
        return False
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, mode)
            view = memoryview(new)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _order_error(p, e) from None
        raise
    try:                                            # make the rename durable
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return True


def _line_id(line: bytes) -> str | None:
    try:
        return line_key(json.loads(line))
    except (ValueError, KeyError, TypeError):
        return None


def _order_error(p: Path, e: OSError) -> FlexrunError:
    return FlexrunError(f"cannot put output file {p} in input order ({e.strerror}): every "
                        "line is kept; fix that (its directory must be writable) and rerun the "
                        "same command to order them")
