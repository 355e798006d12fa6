"""Your own runs replay without --task: the Recorder signs (run id, task) with a key of yours.

A run is data, never code: the task a run's manifest names is called only when the user made it a
task (`register_task`, a `replay.tasks` entry point) or names it (`--task`). A run you recorded
yourself is not a stranger's file, though, so (as Jupyter trusts the notebooks its user saved) the
Recorder signs the run's id and task string with an HMAC-SHA256 key kept outside any run, in the
user's data directory (`$REPLAY_TRUST_DIR`, else `$XDG_DATA_HOME/replay`, else
`~/.local/share/replay`; `trust.key`, mode 0600, made on first use). Compute calls a run's task
string when its signature verifies with that key. A run copied from another user or machine, or
one whose task was edited (and resealed), does not verify and still needs --task, in one line that
says why. Without a writable data directory the run is recorded unsigned (and needs --task).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = "trust.key"


def key_dir() -> Path:
    if d := os.environ.get("REPLAY_TRUST_DIR"):
        return Path(d)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "replay"


def _key(create: bool) -> bytes | None:
    path = key_dir() / KEY_FILE
    try:
        return path.read_bytes()[:32] or None
    except FileNotFoundError:
        if not create:
            return None
    except OSError:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    except FileExistsError:  # another process made it meanwhile
        pass
    except OSError:
        return None
    return _key(create=False)


def _mac(key: bytes, run_id: str, task: str) -> str:
    return hmac.new(key, f"replay-run\0{run_id}\0{task}".encode(), hashlib.sha256).hexdigest()


def sign(run_id: str, task: str) -> str | None:
    """The signature of (run id, task) with this user's key (made if missing); None where none can be kept."""
    key = _key(create=True)
    return _mac(key, run_id, task) if key else None


def verifies(run_id: str, task: str | None, signature: str | None) -> bool:
    """Whether the run's task was signed with this user's key for this very run."""
    if not (task and isinstance(signature, str)):
        return False
    key = _key(create=False)
    return key is not None and hmac.compare_digest(_mac(key, run_id, task), signature)
