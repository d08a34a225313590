"""Record one forward pass at the ATen level into a `Graph`.

A `TorchDispatchMode` sees every ATen op with its real tensor arguments, whatever the model
returns (tuples, dicts, ``ModelOutput``, caches) and whether or not parameters require
grad. Module forward hooks give each op its module scope; a stack walk gives the model-code
``file:line``. The user's model is left as it was found: hooks are removed and buffers that
the forward may update (BatchNorm running stats in train mode) are restored, and the
forward draws from a fork of torch's random state (dropout in train mode), not the caller's.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
import sys
import time
import weakref
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .ir import Graph, OpNode, Value, ValueKind, ValueRef
from .rng import kept_rng
from .walk import tensor_leaves

_TORCH_DIR = os.path.dirname(torch.__file__)
_OUR_DIR = os.path.dirname(os.path.abspath(__file__))
_DEMO_DIR = os.path.join(_OUR_DIR, "demos")
_SKIP_DIRS = (_TORCH_DIR, _OUR_DIR, os.path.dirname(os.__file__))


def _is_model_code(filename: str) -> bool:
    """Frames of the model's own code: not torch, not the stdlib, not us (our demos are)."""
    if filename.startswith("<"):
        return False
    return filename.startswith(_DEMO_DIR + os.sep) or \
        not filename.startswith(tuple(d + os.sep for d in _SKIP_DIRS))


class TraceError(RuntimeError):
    """The model failed to run on the example inputs; the message names module and line."""

    def __init__(self, message: str, module: str = "", location: str = "") -> None:
        super().__init__(message)
        self.module = module  # innermost module running when it failed ("" = the root)
        self.location = location  # model-code file:line of the failing statement


def user_location(frame: Any = None) -> str:
    """``file:line`` of the innermost frame that is model code (not torch, not us)."""
    f = frame if frame is not None else sys._getframe(1)
    while f is not None:
        filename = f.f_code.co_filename
        if _is_model_code(filename):
            return f"{filename}:{f.f_lineno}"
        f = f.f_back
    return ""


def traceback_location(exc: BaseException, files: Collection[str] = ()) -> str:
    """``file:line`` of the innermost frame of an exception's traceback in one of ``files``
    (the model's own source), else of the innermost model-code frame."""
    tb = exc.__traceback__
    found = own = ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if _is_model_code(filename):
            found = f"{filename}:{tb.tb_lineno}"
            if filename in files:
                own = found
        tb = tb.tb_next
    return own or found


def model_files(model: torch.nn.Module) -> set[str]:
    """Source files that define the classes of a model's modules."""
    files: set[str] = set()
    for cls in {type(m) for m in model.modules()}:
        path = _source_file(cls)
        if path and _is_model_code(path):
            files.add(path)
    return files


def _source_file(obj: Any) -> str:
    try:
        return inspect.getsourcefile(obj) or ""
    except (TypeError, OSError):
        return ""


def forward_location(module: torch.nn.Module) -> str:
    """``file:line`` of a module's ``forward`` definition, or "" when it has no source."""
    forward = type(module).forward
    path = _source_file(forward)
    try:
        line = inspect.getsourcelines(forward)[1]
    except (TypeError, OSError):
        return ""
    return f"{path}:{line}" if path else ""


_SCALAR_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)


_MAX_CONSTANT = 64  # elements of a constant integer vector whose values the graph keeps


def _constant_ints(t: torch.Tensor) -> tuple[int, ...] | None:
    """The values of a small integer vector made by the code (``x[..., [-2], :]``'s index
    list), so index rules can follow the elements it selects; None for anything else."""
    if t.dim() != 1 or t.numel() > _MAX_CONSTANT or t.is_meta or t.is_floating_point() or \
            t.is_complex() or t.dtype == torch.bool:
        return None
    return tuple(int(v) for v in t.tolist())


class _Recorder(TorchDispatchMode):
    """Dispatch mode that appends an `OpNode` per ATen call to a `Graph`."""

    def __init__(self, graph: Graph, scope: list[str]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in torch
        self.graph = graph
        self.scope = scope
        self._ids: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self.error_scope: str | None = None  # innermost module when an op raised
        self.index_lists: list[tuple[int, ...]] = []  # of the ``x[...]`` being dispatched

    def register(self, t: torch.Tensor, kind: ValueKind, name: str | None = None,
                 producer: int | None = None) -> int:
        vid = len(self.graph.values)
        self.graph.values[vid] = Value(vid, tuple(t.shape), str(t.dtype).replace("torch.", ""),
                                       kind, name, producer)
        self._ids[id(t)] = (weakref.ref(t), vid)
        return vid

    def _constant(self, t: torch.Tensor) -> tuple[int, ...] | None:
        """Values of a small constant integer vector: read from the tensor, or (on meta,
        where it has none) the integer list of the indexing expression that made it."""
        data = _constant_ints(t)
        if data is not None or not t.is_meta or t.dim() != 1 or t.is_floating_point():
            return data
        for k, values in enumerate(self.index_lists):
            if len(values) == t.numel():
                return self.index_lists.pop(k)
        return None

    def lookup(self, t: torch.Tensor) -> int | None:
        entry = self._ids.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def _ref(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            vid = self.lookup(obj)
            if vid is None:
                vid = self.register(obj, ValueKind.EXTERNAL)
                self.graph.values[vid].data = self._constant(obj)
            return ValueRef(vid)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._ref(o) for o in obj) if isinstance(obj, list) else tuple(
                self._ref(o) for o in obj)
        return obj

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _SCALAR_READS and args and getattr(args[0], "is_meta", False):
            # A meta tensor has no value: data-dependent checks (``mask.all()`` before a
            # fast path) take the ordinary branch, as for an unpadded, unpacked batch.
            return True if args[0].dtype == torch.bool else 0
        try:
            out = func(*args, **kwargs)
        except Exception:
            if self.error_scope is None:
                self.error_scope = self.scope[-1] if self.scope else ""
            raise
        ref_args = tuple(self._ref(a) for a in args)
        ref_kwargs = {k: self._ref(v) for k, v in kwargs.items()}
        has_tensor_input = bool(self.graph.tensor_ids((ref_args, ref_kwargs)))
        index = len(self.graph.ops)
        outs: list[int | None] = []
        flat = out if isinstance(out, (list, tuple)) else (out,)
        kind = ValueKind.ACTIVATION if has_tensor_input else ValueKind.CONST
        for o in flat:
            if isinstance(o, torch.Tensor):
                # In-place and out= ops return an input object: give it a new version.
                outs.append(self.register(o, kind, producer=index))
            else:
                outs.append(None)
        self.graph.ops.append(OpNode(index, func, ref_args, ref_kwargs, outs,
                                     self.scope[-1] if self.scope else "",
                                     user_location(sys._getframe(1))))
        return out


class _IndexLists(TorchFunctionMode):
    """Keeps the integer lists of ``x[..., [-2], :]`` for the recorder: on ``meta`` the
    index tensor made from such a list reaches the dispatcher with no values to read."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func is _GETITEM and len(args) > 1:
            index = args[1]
            parts = index if isinstance(index, tuple) else (index,)
            self.recorder.index_lists = [
                tuple(p) for p in parts if isinstance(p, list) and len(p) <= _MAX_CONSTANT
                and all(isinstance(v, int) and not isinstance(v, bool) for v in p)]
        return func(*args, **(kwargs or {}))


_GETITEM = torch.Tensor.__getitem__


def _module_hooks(model: torch.nn.Module, scope: list[str], recorder: _Recorder) -> list[Any]:
    handles = []
    io = recorder.graph.module_io
    for name, module in model.named_modules():
        def pre(_m: Any, args: Any, name: str = name) -> None:
            scope.append(name)
            if name not in io:  # first call only: shared modules keep their first use
                ins = [recorder.lookup(t) for _p, t in tensor_leaves(args)]
                io[name] = ([v for v in ins if v is not None], [])

        def post(_m: Any, _a: Any, out: Any, name: str = name) -> None:
            if scope:
                scope.pop()
            entry = io.get(name)
            if entry is not None and not entry[1]:
                outs = [recorder.lookup(t) for _p, t in tensor_leaves(out)]
                entry[1].extend(v for v in outs if v is not None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles


def trace(model: torch.nn.Module, example_inputs: Any,
          example_kwargs: Mapping[str, Any] | None = None) -> Graph:
    """Run ``model(*example_inputs, **example_kwargs)`` once and record it.

    Args:
        model: any module, on ``cpu`` or ``meta`` (parameters need not require grad).
        example_inputs: a tensor or a tuple of positional arguments.
        example_kwargs: keyword arguments for the forward.

    Returns:
        The recorded `Graph` (plain data; no tensors kept).

    Raises:
        TraceError: the forward raised; the message names the module and model-code line.
    """
    try:
        return _trace_once(model, example_inputs, example_kwargs)
    except TraceError as error:
        # Some kernels have meta implementations for low precision only (grouped_mm of MoE
        # experts wants bf16): a weightless model whose forward failed on a dtype complaint
        # is traced again in bf16, the same ops; its tensors are put back to their dtypes
        # (nothing to lose on meta). Any other failure (a deadline, a shape) is final.
        cause = error.__cause__
        if not isinstance(cause, (RuntimeError, NotImplementedError)) or \
                not _DTYPE_WORDS.search(str(cause)):
            raise
        with _meta_low_precision(model, example_inputs, example_kwargs) as low:
            if low is None:
                raise
            # failing again, the error is the model's own (a grouped_mm of pruned experts
            # needs rows of a multiple of 16 bytes)
            return _trace_once(model, *low)


def _trace_once(model: torch.nn.Module, example_inputs: Any,
                example_kwargs: Mapping[str, Any] | None) -> Graph:
    graph = _trace(model, example_inputs, example_kwargs, index_lists=False)
    if graph.device == "meta" and _unread_index(graph):
        # on meta, ``x[..., [-2], :]`` reaches the dispatcher as an index tensor with no
        # values: trace again keeping the lists of the indexing expressions (slower)
        graph = _trace(model, example_inputs, example_kwargs, index_lists=True)
    return graph


_LOW = torch.bfloat16
_DTYPE_WORDS = re.compile(r"BFloat16|Float16|\bHalf\b|\bdtype\b")


@contextlib.contextmanager
def _meta_low_precision(model: torch.nn.Module, example_inputs: Any,
                        example_kwargs: Mapping[str, Any] | None) -> Any:
    """For a model whose tensors are all on meta with floating ones not in bf16: the model
    cast to bf16 in place (tensor objects kept) and the inputs cast likewise; yields None
    for any other model. The dtypes are put back on exit."""
    tensors = list({id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    floats = [t for t in tensors if t.is_floating_point() and t.dtype != _LOW]
    if not tensors or not floats or any(not t.is_meta for t in tensors):
        yield None
        return
    dtypes = [t.dtype for t in floats]

    def low(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.to(_LOW)
        if type(x) in (list, tuple):
            return type(x)(low(v) for v in x)
        return x

    try:
        with torch.no_grad():
            for t in floats:
                t.data = t.data.to(_LOW)
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        yield low(inputs), {k: low(v) for k, v in (example_kwargs or {}).items()}
    finally:
        with torch.no_grad():
            for t, dtype in zip(floats, dtypes, strict=True):
                t.data = t.data.to(dtype)


def _unread_index(graph: Graph) -> bool:
    """Whether an ``index`` op took a small integer vector made by the code whose values
    the trace could not read."""
    for node in graph.ops:
        if node.op.overloadpacket is not torch.ops.aten.index:
            continue
        for vid in graph.tensor_ids(node.args[1:]):
            v = graph.values[vid]
            if v.kind is ValueKind.EXTERNAL and v.data is None and len(v.shape) == 1 and \
                    v.shape[0] <= _MAX_CONSTANT and v.dtype in ("int64", "int32"):
                return True
    return False


def _trace(model: torch.nn.Module, example_inputs: Any,
           example_kwargs: Mapping[str, Any] | None, index_lists: bool) -> Graph:
    """`trace`; ``index_lists``: keep the integer lists of indexing expressions."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    graph = Graph()
    scope: list[str] = []
    recorder = _Recorder(graph, scope)
    for name, module in model.named_modules():
        graph.modules[name] = type(module).__name__
    for name, p in model.named_parameters():
        recorder.register(p, ValueKind.PARAM, name)
        graph.param_owner[name] = name.rpartition(".")[0]
    buffers = dict(model.named_buffers())
    for name, b in buffers.items():
        recorder.register(b, ValueKind.BUFFER, name)
        graph.param_owner[name] = name.rpartition(".")[0]
    for path, t in tensor_leaves((args, kwargs), "inputs"):
        graph.inputs.append(recorder.register(t, ValueKind.INPUT, path))
    first = next(iter(model.parameters()), None)
    graph.device = str(first.device) if first is not None else "cpu"
    saved = {n: b.detach().clone() for n, b in buffers.items() if b.device.type != "meta"}
    handles = _module_hooks(model, scope, recorder)
    start = time.perf_counter()
    try:
        lists = _IndexLists(recorder) if index_lists else contextlib.nullcontext()
        with kept_rng(model, (args, kwargs)), torch.no_grad(), recorder, lists:
            out = model(*args, **kwargs)
        for _path, t in tensor_leaves(out):
            vid = recorder.lookup(t)
            if vid is not None:
                graph.outputs.append(vid)
    except Exception as exc:
        where = traceback_location(exc, model_files(model))
        module = recorder.error_scope
        if module is None:
            module = graph.ops[-1].module if graph.ops else ""
        if not where:
            where = forward_location(_submodule(model, module))
        raise TraceError(
            f"the model failed on the example inputs in module '{module or '<root>'}'"
            f"{' at ' + where if where else ''}: {type(exc).__name__}: {exc}",
            module or "", where) from exc
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, b in saved.items():
                buffers[n].copy_(b)
    graph.seconds = time.perf_counter() - start
    return graph


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model
