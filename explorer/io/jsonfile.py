"""JSON files a user's folder holds, read as data: one error line that names the file.

Configs, checkpoint indexes and pipeline settings come from folders the user points us at.
A file that cannot be read, is not UTF-8, is not JSON, nests too deep for the parser or is
larger than such a file can be is one error of the caller's type, ``cannot read <what>
'<file>': <why>`` (a raw ``'utf-8' codec can't decode byte 0xff`` named no file).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_json"]


def read_json(path: Path, what: str, error: type[Exception] = ValueError,
              max_bytes: int | None = None, hint: str = "") -> Any:
    """The JSON value in ``path``.

    Args:
        path: the file.
        what: what the file is, for the message (``transformers config``).
        error: the exception type to raise (the caller's own: `SpecError`, ...).
        max_bytes: refuse a larger file before reading it.
        hint: words after the reason (``; is it a sentence-transformers folder?``).

    Raises:
        error: the file cannot be read, is too large, not UTF-8, not JSON or too deep.
    """
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise error(f"cannot read {what} '{path}': it is {size:,} bytes, more than such a "
                        f"file can be ({max_bytes:,}){hint}")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON
        if isinstance(e, error):
            raise
        why = "it nests too deeply to read" if isinstance(e, RecursionError) else \
            getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
        raise error(f"cannot read {what} '{path}': {why}{hint}") from e
