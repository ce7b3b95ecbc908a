"""One exit-code enum and the exceptions that carry it, so every layer fails the same documented way."""

from __future__ import annotations

import errno
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    NOT_FOUND = 3
    INVALID_INPUT = 4
    CHECK_FAILED = 5
    REFUSED = 6
    DELIVERY_FAILED = 7
    SYSTEM = 8
    INTERRUPTED = 130


#: One line per code, as `dmrepl --help` and the README list them.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "ok"),
    (1, "unexpected error (a bug: run with -v for a traceback)"),
    (2, "usage"),
    (3, "not found"),
    (4, "invalid input (credentials, export, registry)"),
    (5, "connectivity check failed"),
    (6, "refused (wrong status, sync running, weekly rule, registry locked, declined)"),
    (7, "delivery failed (a replication went to ERROR)"),
    (8, "system error (permission, read-only, disk full, missing file or directory)"),
    (130, "interrupted"),
)
EXIT_CODE_HELP = "\n".join(f"{code:>3} {meaning}" for code, meaning in EXIT_CODES)

#: What to run next, by error code, for messages that do not already name a command.
HINTS: dict[str, str] = {
    "NOT_FOUND": "dmrepl list",
    "WRONG_STATUS": "dmrepl show ID",
    "SYNC_RUNNING": "dmrepl sync list",
    "WEEKLY_RULE": "dmrepl sync plan EXPORT... shows when the next run is allowed",
    "ALREADY_EXISTS": "dmrepl list",
    "REGISTRY_LOCKED": "run it again, or raise --wait",
    "REGISTRY_INVALID": "dmrepl home shows where the registry is",
    "INVALID_CREDENTIALS": "fix the fields named above, then run the same command again",
    "EXPORT_CHANGED": "dmrepl sync start EXPORT...",
    "CHECK_FAILED": "fix what the failed step says, then dmrepl check ID",
    "REPLICATION_ERROR": "dmrepl recreate ID --credentials FILE, then dmrepl activate ID",
}


def hint_for(code: str, message: str) -> str | None:
    """The next command to run, unless the message already names one."""
    hint = HINTS.get(code)
    return None if hint is None or "dmrepl " in message else hint


class DmreplError(Exception):
    """An expected failure: the CLI prints `message` on one line and exits with `exit_code`, no traceback."""

    exit_code: ExitCode = ExitCode.UNEXPECTED
    code: str = "ERROR"

    def __init__(self, message: str, *, code: str | None = None, details: object = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class UsageError(DmreplError):
    exit_code = ExitCode.USAGE
    code = "USAGE"


class NotFoundError(DmreplError):
    exit_code = ExitCode.NOT_FOUND
    code = "NOT_FOUND"


class InvalidInputError(DmreplError):
    exit_code = ExitCode.INVALID_INPUT
    code = "INVALID_INPUT"


class CheckFailedError(DmreplError):
    exit_code = ExitCode.CHECK_FAILED
    code = "CHECK_FAILED"


class RefusedError(DmreplError):
    exit_code = ExitCode.REFUSED
    code = "REFUSED"


class DeliveryFailedError(DmreplError):
    exit_code = ExitCode.DELIVERY_FAILED
    code = "DELIVERY_FAILED"


class SystemFailure(DmreplError):
    """The operating system refused: a file or directory dmrepl needs is not writable, missing, or the disk is full.
    Not a bug (exit 1 is kept for those), and not the user's input either."""

    exit_code = ExitCode.SYSTEM
    code = "OS_ERROR"


_OS_HINTS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota)",
    errno.EROFS: "the file system is read-only: point --home or DMREPL_HOME at a writable directory",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.ENOTDIR: "a path component is a file, not a directory (check --home / DMREPL_HOME)",
    errno.ENOENT: "the file or directory is missing",
}


def describe_os_error(exc: OSError) -> str:
    """`<path>: <cause>` in one line, with what to do."""
    where = exc.filename if exc.filename is not None else "a file"
    if exc.filename2 is not None:
        where = f"{exc.filename} → {exc.filename2}"
    text = f"{where}: {exc.strerror or exc}"
    hint = _OS_HINTS.get(exc.errno or 0)
    return f"{text} ({hint})" if hint else text


def os_error(exc: OSError) -> SystemFailure:
    return SystemFailure(describe_os_error(exc))


class InterruptedError_(DmreplError):
    exit_code = ExitCode.INTERRUPTED
    code = "INTERRUPTED"


class Interrupted(BaseException):
    """Raised by dmrepl's SIGTERM handler so long runs unwind and checkpoint exactly as on Ctrl-C."""
