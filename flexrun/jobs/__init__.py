"""Batch jobs on JSONL files: read and check the input (plain lines or OpenAI Batch API
requests), turn lines into requests for the loaded model, resume from the output, append
safely, and put the finished output in the input's order."""
from __future__ import annotations

from pathlib import Path

from flexrun.config import FlexrunError
from flexrun.jobs.fields import JobItem, LineError, derived_seed
from flexrun.jobs.openai import error_line, is_openai_line, read_openai, response_line
from flexrun.jobs.output import (OutputWriter, check_output_path, finished_ids, line_key,
                                 order_output)
from flexrun.jobs.pieces import Pieces
from flexrun.jobs.plain import input_lines, plain_line, read_input
from flexrun.jobs.prepare import (Request, calls, model_names, openai_request,
                                  plain_request)

FORMATS = ("auto", "plain", "openai")


def detect_format(path: str | Path) -> str:
    """"openai" when the first non-blank line is an object with "custom_id" and "body"."""
    for _, line in input_lines(Path(path)):
        return "openai" if is_openai_line(line) else "plain"
    return "plain"


def read_job(path: str | Path, fmt: str = "auto") -> tuple[str, list[JobItem]]:
    """(the format, the input's items); fmt "auto" detects it from the first line."""
    if fmt not in FORMATS:
        raise FlexrunError(f"unknown --format {fmt!r}: use {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path)
    return fmt, read_openai(path) if fmt == "openai" else read_input(path)


__all__ = ["FORMATS", "JobItem", "LineError", "OutputWriter", "Pieces", "Request", "calls",
           "check_output_path", "derived_seed", "detect_format", "error_line", "finished_ids",
           "line_key", "model_names", "openai_request", "order_output", "plain_line",
           "plain_request", "read_input", "read_job", "read_openai", "response_line"]
