"""One exception type for every problem a user can fix; CLIs print its message and exit non-zero."""
from __future__ import annotations

import difflib
import functools
import os
import sys


class UserError(Exception):
    """Bad input, config or environment: the message names the file, line or field and what to do."""


def suggest(name: str, choices) -> str:
    """' (did you mean X?)' for the nearest valid key, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def cli_main(fn):
    """Wrap a CLI ``main``: a UserError (or a missing file) prints one line and exits 2; ``--debug`` keeps tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = "--debug" in sys.argv or os.environ.get("CANCERLLM_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if debug:
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
