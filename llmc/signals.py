"""Interrupts for the command line: SIGINT and SIGTERM become exceptions that unwind every
`with` block (so partial outputs are removed), then the CLI prints one line and exits 130 / 143.

They derive from BaseException, not KeyboardInterrupt, so nothing on the way (typer included)
mistakes them for an ordinary error or swallows them. Library callers keep Python's defaults:
only `install()` (called by the `llmc` command) changes the handlers.
"""
from __future__ import annotations

import signal


class Interrupted(BaseException):
    """SIGINT (Ctrl-C)."""
    exit_code = 130
    message = "interrupted"


class Terminated(Interrupted):
    """SIGTERM."""
    exit_code = 143
    message = "terminated"


def _raise(signum, frame):
    raise Terminated() if signum == signal.SIGTERM else Interrupted()


def install() -> None:
    """SIGINT and SIGTERM raise Interrupted / Terminated in the main thread. A signal the parent
    ignores (a background job's SIGINT) stays ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _raise)
