"""The one-line feedback the app shows after an action."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..prune.preflight import Verdict


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
    """``verdict``'s failure in words: what, where (module and line), the error."""
    where = " ".join(x for x in (verdict.module, verdict.location) if x)
    return f"{what}{' in ' + where if where else ''}: {verdict.error}"


__all__ = ["Message", "MessageKind", "failure"]
