"""How a command stops when it does not finish: one line for the user, never a traceback, the usual exit codes.

A `TaxaDiffusionError` is the user's to fix (exit 2). Ctrl-C (exit 130) and SIGTERM (exit 143, what `kill`, SLURM
and Kubernetes send) stop the work where it is: every file being written is written whole or rolled back
(atomic.py), checkpoints are published by rename, so the same command continues. A full disk, a quota or a
read-only folder is an OS error with a file name: said in one line too (exit 74, sysexits' EX_IOERR). Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import TaxaDiffusionError

# OS errors that are the machine's state, not a bug: the message names the file and what to do.
RESOURCE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EFBIG: "the file is too large for the file system",
    errno.EIO: "an input/output error",
}
CONTINUES = "run the same command to continue"


class Terminated(BaseException):
    """SIGTERM, raised where the process is (as Ctrl-C raises KeyboardInterrupt)."""


def _terminate(signum, frame) -> None:
    raise Terminated


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """While the command runs, SIGTERM raises `Terminated` (in the main thread; elsewhere it keeps its handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resource_error(error: BaseException) -> str | None:
    """The one-line reason of an OS error that is the machine's state (see RESOURCE_ERRORS), else None.
    safetensors reports a full disk as its own error type, with the OS's words in the message."""
    if isinstance(error, OSError) and error.errno in RESOURCE_ERRORS:
        where = f" writing {error.filename}" if error.filename else ""
        return f"{RESOURCE_ERRORS[error.errno]}{where}"
    text = str(error)
    for code, words in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded")):
        if type(error).__name__ == "SafetensorError" and words in text:
            return RESOURCE_ERRORS[code]
    return None


def run_command(command, args) -> int:
    """Run one command; every stop that is not a bug becomes one line on stderr and an exit code."""
    try:
        with sigterm_stops():
            return command(args)
    except TaxaDiffusionError as error:
        return _say(f"error: {error}", 2)
    except KeyboardInterrupt as stop:
        return _say(f"interrupted{_where(stop)}; {CONTINUES}", 130)
    except Terminated as stop:
        return _say(f"terminated (SIGTERM){_where(stop)}; {CONTINUES}", 143)
    except Exception as error:
        reason = resource_error(error)
        if reason is None:
            raise  # a bug: keep the traceback
        return _say(f"error: {reason}; what was written before is intact; free space and {CONTINUES}", 74)


def _where(stop: BaseException) -> str:
    """Where the work stood, when the command noted it on the exception (`stop.where`)."""
    where = getattr(stop, "where", "")
    return f" {where}" if where else ""


def _say(line: str, code: int) -> int:
    """The line on stderr, on a line of its own even where a progress bar was being drawn."""
    from tqdm.auto import tqdm

    tqdm.write(f"taxadiffusion: {line}", file=sys.stderr)
    return code
