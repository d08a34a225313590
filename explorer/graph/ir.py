"""The traced graph: a closed, plain-data record of one forward pass at the ATen level.

A `Graph` is what the tracer produces and every analysis reads. It holds no tensors, only
shapes, so it is cheap to keep, to copy and to serialise.

Value kinds (`ValueKind`):
    PARAM:    a named parameter of the model (``name`` is its qualified name).
    BUFFER:   a named buffer (BatchNorm running stats, rotary ``inv_freq``, ...).
    INPUT:    a tensor leaf of the example inputs.
    ACTIVATION: the output of a recorded op.
    CONST:    made inside the forward by a factory op (``zeros``, ``arange``, ...).
    EXTERNAL: a tensor the forward used that is none of the above (a plain tensor attribute,
              a closure constant); it first appears as an op argument.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class ValueKind(enum.Enum):
    PARAM = "param"
    BUFFER = "buffer"
    INPUT = "input"
    ACTIVATION = "activation"
    CONST = "const"
    EXTERNAL = "external"


@dataclass(frozen=True)
class ValueRef:
    """A tensor argument inside `OpNode.args`, by value id."""

    vid: int


@dataclass
class Value:
    """One tensor version seen during the trace."""

    vid: int
    shape: tuple[int, ...]
    dtype: str
    kind: ValueKind
    name: str | None = None  # parameter/buffer name, or input path like "inputs[0]"
    producer: int | None = None  # index of the op that made it (None for leaves)
    data: tuple[int, ...] | None = None  # values of a small constant integer vector (index lists)


@dataclass
class OpNode:
    """One ATen op call.

    Attributes:
        index: position in execution order.
        op: the ``OpOverload`` object (identity-keyed rules use ``op.overloadpacket``).
        args: positional arguments, tensors replaced by `ValueRef`; lists/tuples kept.
        kwargs: keyword arguments, same convention.
        outputs: value ids of tensor outputs, flattened in order (None for non-tensor slots).
        module: qualified name of the innermost module running this op ("" = the root).
        location: ``file:line`` of the innermost model-code frame, or "".
    """

    index: int
    op: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[int | None]
    module: str
    location: str

    @property
    def name(self) -> str:
        """Readable op name such as ``aten.add.Tensor``."""
        return str(self.op)

    @property
    def short(self) -> str:
        """Op name without namespace and overload (``add``)."""
        return str(self.op.overloadpacket.__name__)

    @property
    def scope(self) -> str:
        """The module running this op as messages name it: ``module``, or ``<root>``."""
        return self.module or "<root>"


@dataclass
class Graph:
    """A traced forward: values, ops, model inputs/outputs and module metadata."""

    values: dict[int, Value] = field(default_factory=dict)
    ops: list[OpNode] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)  # tensor leaves of the model output
    modules: dict[str, str] = field(default_factory=dict)  # qualified name -> class name
    param_owner: dict[str, str] = field(default_factory=dict)  # param/buffer name -> module name
    # module name -> (tensor input value ids, tensor output value ids) of its first call
    module_io: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"

    def tensor_ids(self, args: Any) -> list[int]:
        """All value ids referenced in a (nested) argument structure."""
        return [ref.vid for ref in value_refs(args)]


def value_refs(obj: Any) -> list[ValueRef]:
    """Every `ValueRef` in a nested structure of op arguments, in order."""
    found: list[ValueRef] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, ValueRef):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
    return found
