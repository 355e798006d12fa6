"""User-facing errors: one line that names what is wrong, where, and what to do.

The CLI prints `str(err)` and exits 1 for any `ReplayError`; anything else is a bug
and keeps its traceback.
"""


class ReplayError(Exception):
    """Base of every error a user can cause and fix (bad input, damaged run, ...)."""


class RunError(ReplayError):
    """The run directory is missing, not a run, or inconsistent with the request."""


class ChunkDamaged(RunError):
    """A chunk file is truncated, unreadable or fails its checksum."""


class RecordError(ReplayError):
    """Recording cannot continue (model changed, disk full, run dir not empty...)."""


class TaskError(ReplayError):
    """The task cannot be imported, built, or does not match the run."""


class SettingError(ReplayError, ValueError):
    """An option has a value replay cannot use (a ValueError too, as Python's own argument errors are)."""


class ReplayWarning(UserWarning):
    """Something the user must know to read the numbers right; the CLI prints it as one line."""


def os_reason(e: OSError) -> str:
    """What an OSError of a write means for the user, in words (one table for every writer of replay)."""
    import errno

    return {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.ENOENT: "the directory was deleted or moved meanwhile",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the file system is read-only",
        errno.ENOTDIR: "a component of the path is a file, not a directory",
        errno.EFBIG: "the file is larger than this process may write",
    }.get(e.errno, e.strerror or str(e))
