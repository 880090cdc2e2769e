"""How a command ends on an error that is not a bug: one line on stderr and an exit code,
shared by `hybridlm` and `python -m hybridlm.train` (this module imports nothing of ours, so
every layer may use it)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


class RunError(RuntimeError):
    """A run stopped for a reason of its data or settings (e.g. non-finite losses), not a
    bug: commands report it in one line, like a ValueError."""


def describe_os_error(err: OSError) -> str:
    """'Permission denied: runs/x/tokenizer.json' rather than "[Errno 13] Permission denied:
    'runs/x/tokenizer.json'"; errors of our own (no errno) keep their message."""
    if err.strerror is None:
        return str(err)
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{err.strerror}: {' -> '.join(paths)}" if paths else err.strerror


def one_line(message: str) -> str:
    """Some messages (YAML's parse errors) span lines; the error stays one line."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


def stop_writing_stdout() -> None:
    """Python flushes stdout at exit: into a closed pipe that would raise once more."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (captured, or already closed)
        pass


def run_reporting_errors(func: Callable[[argparse.Namespace], None], args: argparse.Namespace,
                         name: str) -> int:
    """Run a command; bad input, an unreadable or unwritable path (OSError: permissions, a
    full disk, a missing file) or a run stopped by non-finite losses (RunError) ends in one
    line on stderr and exit code 2, not a traceback. Ctrl-C ends in one line and exit code
    130; a closed stdout (`| head`) in silence and exit code 141. Anything else is a bug and
    keeps its traceback."""
    try:
        func(args)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
        stop_writing_stdout()
        return 141  # 128 + SIGPIPE, as a tool killed by the closed pipe reports
    except OSError as err:  # the environment, not the code: name the path and stop
        print(f"hybridlm {name}: error: {one_line(describe_os_error(err))}", file=sys.stderr)
        return 2
    except (ValueError, RunError) as err:
        print(f"hybridlm {name}: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hybridlm {name}: interrupted", file=sys.stderr)
        return 130
    return 0
