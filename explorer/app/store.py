"""Session logs on disk, so an app session survives a browser refresh.

The app puts a session id in the page URL (``?sid=...``) and writes, after every decision,
the model request and the session's action log to ``<dir>/<sid>.json``. On a fresh page
with that id the model is loaded again and the log replayed (`Session.replay`). The id
comes from a URL, so it is data: only 32 lowercase hex characters are accepted, and the
file is read as JSON, never executed.

Logs name local paths and data, so they are private: the folder is made (or put back to)
0700 and every log in it 0600. A log is only read and written inside its folder (a link out
of it is never followed). What a hand-edited log holds is checked when it is replayed
(`explorer.app.session.Session.replay` reports and skips actions it does not know).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.paths import PathError, inside

_SID = re.compile(r"[0-9a-f]{32}")


def session_dir() -> Path:
    """``$PE_SESSION_DIR`` or ``~/.cache/pruning-explorer/sessions``."""
    env = os.environ.get("PE_SESSION_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pruning-explorer" / "sessions"


def new_sid() -> str:
    return secrets.token_hex(16)


def valid_sid(sid: object) -> bool:
    return isinstance(sid, str) and _SID.fullmatch(sid) is not None


@dataclass
class SavedSession:
    """What a page refresh needs: the model request and the decisions taken on it."""

    request: dict[str, str | int]  # the Model page's request (`sources.LoadRequest` fields)
    actions: list[Any] = field(default_factory=list)  # `Session.actions`; a hand-edited log
    # may hold anything here: `Session.replay` skips and reports what it does not know


def save(sid: str, saved: SavedSession, directory: Path | None = None) -> None:
    """Write the log atomically (a half-written file is never read back), readable by its
    owner only.

    Raises:
        OSError: if the folder cannot be made private or the log written.
    """
    if not valid_sid(sid):
        raise ValueError(f"invalid session id {sid!r}")
    folder = _private_folder(directory or session_dir())
    # a new file of a random name, 0600 (O_EXCL: never written through a planted link)
    fd, tmp = tempfile.mkstemp(prefix=f".{sid}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"request": saved.request, "actions": saved.actions}, f)
        os.replace(tmp, folder / f"{sid}.json")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _private_folder(folder: Path) -> Path:
    """``folder``, made if missing, with mode 0700 and its logs 0600 (looser modes from an
    earlier version or a hand copy are tightened)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(folder.stat().st_mode) != 0o700:
        folder.chmod(0o700)
    for log in folder.glob("*.json"):
        if not log.is_symlink() and stat.S_IMODE(log.stat().st_mode) & 0o077:
            log.chmod(0o600)
    return folder


def load(sid: str, directory: Path | None = None) -> SavedSession | None:
    """The saved session ``sid``, or None when there is none (or it is not readable)."""
    if not valid_sid(sid):
        return None
    folder = directory or session_dir()
    try:
        path = inside(folder, f"{sid}.json", folder, "session log")
    except PathError:
        return None  # a link out of the session folder is never read
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    req = data.get("request") if isinstance(data, dict) else None
    acts = data.get("actions") if isinstance(data, dict) else None
    if not (isinstance(req, dict) and isinstance(req.get("spec"), str)
            and all(isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool)
                    for k, v in req.items())
            and isinstance(acts, list)):
        return None
    return SavedSession(dict(req), acts)  # each action is checked when it is replayed


def forget(sid: str, directory: Path | None = None) -> None:
    """Delete the saved log of ``sid`` (a Reset)."""
    if valid_sid(sid):
        ((directory or session_dir()) / f"{sid}.json").unlink(missing_ok=True)
