"""``<path>.py:<callable>``: a user factory returning a module or ``(module, example_inputs)``.

Errors in the user's file are reported with the ``file:line`` where they happened.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ...quality.task import ModelKind
from ._types import Built, ModelFamily, SpecError


def build_factory(path: Path, attr: str, device: str) -> Built:
    """Import ``path``, call ``attr()`` and move the model it returns to ``device``.

    Raises:
        SpecError: if the file or callable is missing, it raises, or it returns something else.
    """
    if not path.is_file():
        raise SpecError(f"factory file {str(path)!r} does not exist (spec '{path}:{attr}')")
    module = _import_file(path)
    factory = getattr(module, attr, None)
    if not callable(factory):
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise SpecError(
            f"{str(path)!r} has no callable {attr!r}; "
            f"callables there: {', '.join(public) or 'none'}"
        )
    try:
        result = factory()
    except Exception as e:  # any user error: report where it happened in the user's file
        raise SpecError(
            f"factory {path}:{attr}() raised {type(e).__name__}: {e} (at {_user_frame(e, path)})"
        ) from e
    model, inputs = _unpack_factory_result(result, path, attr)
    return Built(model.to(device), inputs, ModelFamily.FACTORY, _guess_kind(inputs))


_OWNED: set[str] = set()  # module names this loader registered (a rebuild replaces them)


def _import_file(path: Path) -> ModuleType:
    """Import a Python file under its stem, with its folder on ``sys.path``.

    Classes defined there are then pickled as ``<stem>.<Class>``, so a ``model.pt`` of the
    model loads wherever that folder is on ``sys.path``. A stem that names another module
    (``json.py``, an installed package) is refused: the file must be renamed.
    """
    path = path.resolve()
    name = path.stem
    if not name.isidentifier():
        raise SpecError(
            f"factory file name {path.name!r} is not a Python module name; rename it to "
            "letters, digits and underscores (it is imported as a module)"
        )
    if name not in _OWNED:
        _claim(name, path)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken user file: say where
        if previous is None:
            del sys.modules[name]
        else:
            sys.modules[name] = previous
        raise SpecError(
            f"importing {str(path)!r} raised {type(e).__name__}: {e} (at {_user_frame(e, path)})"
        ) from e
    _OWNED.add(name)
    return module


def _claim(name: str, path: Path) -> None:
    """Put ``path``'s folder on ``sys.path`` and check that ``import <name>`` finds ``path``."""
    clash = sys.modules.get(name)
    origin = getattr(clash, "__file__", None) if clash is not None else None
    if clash is None:
        folder = str(path.parent)
        if folder not in sys.path:
            sys.path.append(folder)
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            found = None
        origin = found.origin if found is not None else None
    if origin is None or Path(origin).resolve() != path:
        raise SpecError(
            f"factory file {str(path)!r} is imported as module {name!r}, but that name is "
            f"already {origin or 'a built-in module'}; rename the file"
        )


def _user_frame(error: BaseException, path: Path) -> str:
    """``file:line`` of the innermost traceback frame inside ``path`` (or the innermost frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}"
    target = path.resolve()
    mine = [f for f in frames if Path(f.filename).resolve() == target]
    frame = (mine or frames)[-1] if frames else None
    return f"{frame.filename}:{frame.lineno}" if frame else str(path)


def _unpack_factory_result(result: Any, path: Path, attr: str) -> tuple[nn.Module, tuple[Any, ...]]:
    if isinstance(result, nn.Module):
        return result, (_default_input_for(result, path, attr),)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        inputs = result[1]
        if isinstance(inputs, torch.Tensor):
            return result[0], (inputs,)
        if isinstance(inputs, (tuple, list)):
            return result[0], tuple(inputs)
    raise SpecError(
        f"{path}:{attr}() returned {type(result).__name__}; it must return an nn.Module or "
        "(nn.Module, example_inputs) with example_inputs a tensor or a tuple of them"
    )


def _default_input_for(model: nn.Module, path: Path, attr: str) -> torch.Tensor:
    """A (1, in_features) or (1, C, 224, 224) input guessed from the first Linear / Conv2d."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return torch.randn(1, module.in_channels, 224, 224)
        if isinstance(module, nn.Linear):
            return torch.randn(1, module.in_features)
    raise SpecError(
        f"{path}:{attr}() returned only a module and no Linear/Conv2d to guess its input from; "
        "return (module, example_inputs) instead"
    )


def _guess_kind(inputs: tuple[Any, ...]) -> ModelKind:
    first = inputs[0] if inputs else None
    if isinstance(first, torch.Tensor):
        if first.is_floating_point() and first.dim() == 4:
            return ModelKind.VISION
        if not first.is_floating_point() and first.dim() == 2:
            return ModelKind.LM
    return ModelKind.OTHER
