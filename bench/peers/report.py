"""How a peer prints its result: one `<TAG> {json}` line, also when it fails (the error text and
the traceback's tail in place of the figures, exit status 1), so a result is never a blank."""
from __future__ import annotations

import json
import sys
import traceback
from typing import Callable


def run_and_report(tag: str, run: Callable[[], dict],
                   on_error: Callable[[], dict] = dict) -> None:
    """Print `tag` and run()'s dict as JSON; on an exception, the error, the traceback's tail
    and on_error()'s fields (what the peer can still say: its config, versions)."""
    try:
        res, code = run(), 0
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {e}"[:2000],
               "traceback_tail": traceback.format_exc()[-3000:]}
        try:
            res.update(on_error())
        except Exception:       # noqa: BLE001 (what it says is optional)
            pass
        code = 1
    print(f"{tag} " + json.dumps(res, default=str), flush=True)
    if code:
        sys.exit(code)
