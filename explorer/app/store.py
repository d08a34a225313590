"""Session logs on disk, so an app session survives a browser refresh.

The app puts a session id in the page URL (``?sid=...``) and writes, after every decision,
the model request and the session's action log to ``<dir>/<sid>.json``. On a fresh page
with that id the model is loaded again and the log replayed (`Session.replay`). The id
comes from a URL, so it is data: only 32 lowercase hex characters are accepted, and the
file is read as JSON, never executed.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    actions: list[dict[str, Any]] = field(default_factory=list)


def save(sid: str, saved: SavedSession, directory: Path | None = None) -> None:
    """Write the log atomically (a half-written file is never read back)."""
    if not valid_sid(sid):
        raise ValueError(f"invalid session id {sid!r}")
    folder = directory or session_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{sid}.json.tmp"
    tmp.write_text(json.dumps({"request": saved.request, "actions": saved.actions}),
                   encoding="utf-8")
    tmp.replace(folder / f"{sid}.json")


def load(sid: str, directory: Path | None = None) -> SavedSession | None:
    """The saved session ``sid``, or None when there is none (or it is not readable)."""
    if not valid_sid(sid):
        return None
    path = (directory or session_dir()) / f"{sid}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    req = data.get("request") if isinstance(data, dict) else None
    acts = data.get("actions") if isinstance(data, dict) else None
    if not (isinstance(req, dict) and isinstance(req.get("spec"), str)
            and all(isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool)
                    for k, v in req.items())
            and isinstance(acts, list) and all(isinstance(a, dict) for a in acts)):
        return None
    return SavedSession(dict(req), acts)


def forget(sid: str, directory: Path | None = None) -> None:
    """Delete the saved log of ``sid`` (a Reset)."""
    if valid_sid(sid):
        ((directory or session_dir()) / f"{sid}.json").unlink(missing_ok=True)
