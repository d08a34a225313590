"""The one-line feedback the app shows after an action."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..prune.preflight import Verdict
from ..render.proposal_view import short_location


class MessageKind(str, enum.Enum):
    """How the app shows a `Message`."""

    SUCCESS = "success"
    ERROR = "error"
    INFO = "info"


@dataclass
class Message:
    """Feedback for the user after an action."""

    kind: MessageKind
    text: str

    @classmethod
    def success(cls, text: str) -> Message:
        return cls(MessageKind.SUCCESS, text)

    @classmethod
    def error(cls, text: str) -> Message:
        return cls(MessageKind.ERROR, text)

    @classmethod
    def info(cls, text: str) -> Message:
        return cls(MessageKind.INFO, text)


def failure(verdict: Verdict, what: str = "pre-flight failed") -> str:
    """``verdict``'s failure in words: what, where (module and ``file.py:line``), the error."""
    location = short_location(verdict.location) if verdict.location else ""
    where = " ".join(x for x in (verdict.module, location) if x)
    return f"{what}{' in ' + where if where else ''}: {verdict.error}"


__all__ = ["Message", "MessageKind", "failure"]
