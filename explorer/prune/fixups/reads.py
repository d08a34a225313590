"""What a module's own code reads: its attributes, its config's fields, widths it derives.

Fix-ups decide from a module's source whether a value matters to it. Four questions, one
reader of the source:

* `reads_attribute`: does any method of the class (``__init__`` aside) read ``self.<attr>``?
  One no method reads only describes the module (``LlamaDecoderLayer.hidden_size``): a cut
  leaves it to the config update, which sets it from the config describing the model.
* `config_reads`: which ``self.config.<field>`` does ``forward`` read, itself or through the
  methods it calls (``self._split_heads(...)``, transitively), each with its ``file:line``.
* `derived_widths`: where ``forward`` (or a method it calls) divides a config field by a
  head count (``self.config.hidden_size // self.num_heads``): a head width the code derives
  instead of reading it, so a cut that changes the count changes the value, whatever the
  shapes say.
* `assignment`: where ``__init__`` builds ``self.<attr>`` (the statements and their
  ``file:line``), to name the model line a config cannot size as cut.

Sources are parsed once per class. A class whose source cannot be read counts as reading
everything it is asked about (`reads_attribute`) and as reading nothing through its config.
"""
from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...coupling.heads import HEAD_COUNT_ATTRS, KV_HEAD_ATTRS

__all__ = ["Assignment", "Derived", "assignment", "config_reads", "derived_widths",
           "reads_attribute"]

_COUNTS = frozenset(HEAD_COUNT_ATTRS + KV_HEAD_ATTRS)  # what a head width is divided by


@dataclass(frozen=True)
class Derived:
    """A value a forward derives by dividing a config field by a head count."""

    field: str  # the config field divided (``hidden_size``)
    counts: tuple[str, ...]  # what it is divided by: ``num_heads`` or ``config.<field>``
    code: str  # the expression, as written
    where: str  # file:line


@dataclass(frozen=True)
class Assignment:
    """Where a constructor builds one of its attributes."""

    code: str  # the statement, as parsed (``self.query_key_value = nn.Linear(...)``)
    where: str  # file:line


_ATTRS: dict[tuple[type, str], bool] = {}  # (class, attribute) -> read: sources read once
_CLASSES: dict[type, tuple[tuple[tuple[str, str], ...], tuple[Derived, ...]]] = {}


def reads_attribute(cls: type, attr: str) -> bool:
    """Whether a method of ``cls`` (its own classes, not torch's; ``__init__`` aside) reads
    ``self.<attr>``. No source to read counts as a read."""
    key = (cls, attr)
    if key not in _ATTRS:
        _ATTRS[key] = _reads_attribute(cls, attr)
    return _ATTRS[key]


def _reads_attribute(cls: type, attr: str) -> bool:
    pattern = re.compile(rf"\.{re.escape(attr)}\b")
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        for fname, fn in vars(klass).items():
            if fname == "__init__" or not inspect.isfunction(fn):
                continue
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):
                return True
            if pattern.search(source):
                return True
    return False


def assignment(cls: type, attr: str) -> tuple[Assignment, ...]:
    """The statements of ``cls.__init__`` that assign ``self.<attr>``, in source order
    (branches each have theirs: GPT-2 builds ``c_attn`` one way for cross-attention, another
    otherwise); empty where there is none or no source to read."""
    parsed = _parse(cls, "__init__")
    if parsed is None:
        return ()
    tree, path, first = parsed
    found = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Attribute) and t.attr == attr and isinstance(t.value, ast.Name)
        and t.value.id == "self" for t in n.targets)), key=lambda n: n.lineno)
    return tuple(Assignment(ast.unparse(n), f"{path}:{first + n.lineno - 1}") for n in found)


def config_reads(module: nn.Module) -> dict[str, str]:
    """``field -> file:line`` of every ``self.config.<field>`` (or ``getattr(self.config,
    "<field>", ...)``) that the module's ``forward`` reads, in its own body or in a method of
    its class it calls as ``self.<method>(...)`` (transitively); empty where the source is
    not readable."""
    return dict(_class_reads(type(module))[0])


def derived_widths(module: nn.Module) -> tuple[Derived, ...]:
    """Expressions in ``forward`` (or a method it calls) that divide a config field by a
    head count: ``self.config.hidden_size // self.num_heads``."""
    return _class_reads(type(module))[1]


def _class_reads(cls: type) -> tuple[tuple[tuple[str, str], ...], tuple[Derived, ...]]:
    """`config_reads` and `derived_widths` of ``cls``, its sources parsed once."""
    if cls not in _CLASSES:
        _CLASSES[cls] = _parse_reads(cls)
    return _CLASSES[cls]


def _parse_reads(cls: type) -> tuple[tuple[tuple[str, str], ...], tuple[Derived, ...]]:
    found: dict[str, str] = {}
    derived: list[Derived] = []
    for tree, path, first in _methods(cls, "forward"):
        nodes = sorted((n for n in ast.walk(tree) if isinstance(n, ast.expr)),
                       key=lambda n: (n.lineno, n.col_offset))  # a method's first read first
        for node in nodes:
            field = _config_field(node)
            if field is not None:
                found.setdefault(field, f"{path}:{first + node.lineno - 1}")
            elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.FloorDiv, ast.Div)):
                fields = [f for n in ast.walk(node.left) if (f := _config_field(n))]
                counts = tuple(c for n in ast.walk(node.right) if (c := _count(n)))
                if fields and counts:
                    derived.append(Derived(fields[0], counts, ast.unparse(node),
                                           f"{path}:{first + node.lineno - 1}"))
    return tuple(sorted(found.items(), key=lambda kv: kv[1])), tuple(derived)


def _methods(cls: type, start: str) -> Iterator[tuple[ast.AST, str, int]]:
    """(syntax tree, file, first line) of method ``start`` of ``cls`` and of every method of
    ``cls`` it calls as ``self.<name>(...)``, transitively, each once, in the order a run
    would first enter them (a method's calls in source order, each followed down first)."""
    todo, seen = [start], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parsed = _parse(cls, name)
        if parsed is None:
            continue
        yield parsed
        calls = sorted((node.lineno, node.col_offset, node.func.attr)
                       for node in ast.walk(parsed[0])
                       if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                       and isinstance(node.func.value, ast.Name) and node.func.value.id == "self")
        todo.extend(attr for *_pos, attr in reversed(calls))  # the first call is next


def _parse(cls: type, name: str) -> tuple[ast.AST, str, int] | None:
    """The method ``name`` of ``cls`` parsed, or None: not a function of the class (a
    submodule, which lives on the instance), torch's own, or no source."""
    try:
        fn: Any = inspect.getattr_static(cls, name)
    except AttributeError:
        return None
    if isinstance(fn, (staticmethod, classmethod)):
        fn = fn.__func__
    fn = inspect.unwrap(fn) if callable(fn) else fn  # under decorators (deprecated kwargs)
    if not inspect.isfunction(fn) or fn.__module__.startswith("torch."):
        return None
    try:
        lines, first = inspect.getsourcelines(fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
        path = inspect.getsourcefile(fn) or "?"
    except (OSError, TypeError, SyntaxError, ValueError):
        return None
    return tree, path, first


def _config_field(node: ast.AST) -> str | None:
    """The field ``node`` reads as ``self.config.<field>`` or ``getattr(self.config,
    "<field>", ...)``, else None."""
    if isinstance(node, ast.Attribute) and _self_config(node.value):
        return node.attr
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
            node.func.id == "getattr" and len(node.args) >= 2 and \
            _self_config(node.args[0]) and isinstance(node.args[1], ast.Constant) and \
            isinstance(node.args[1].value, str):
        return node.args[1].value
    return None


def _count(node: ast.AST) -> str | None:
    """``num_heads`` for ``self.num_heads``, ``config.num_attention_heads`` for
    ``self.config.num_attention_heads`` (a head count), else None."""
    field = _config_field(node)
    if field is not None:
        return f"config.{field}" if field in _COUNTS else None
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
            node.value.id == "self" and node.attr in _COUNTS:
        return node.attr
    return None


def _self_config(node: ast.expr) -> bool:
    """Whether ``node`` is ``self.config``."""
    return isinstance(node, ast.Attribute) and node.attr == "config" and \
        isinstance(node.value, ast.Name) and node.value.id == "self"
