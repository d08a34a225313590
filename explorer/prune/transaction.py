"""All or nothing: put a model back exactly as it was when a change to it fails.

Every mutation path (a pruner step, an accepted proposal, a plan replay, loading exported
weights) runs inside `transaction`. It records, per module, which parameter, buffer and
submodule objects it holds, every other attribute (widths, head counts, the ``training``
flag) and the attributes of a transformers ``config``; on any exception it puts all of them
back and re-raises. Pruning replaces tensors rather than writing into them, so restoring the
objects restores the values bit for bit; a path that writes into tensors in place (loading
weights) must check everything before its first write.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["ModelState", "left_as_found", "transaction"]

_SLOTS = ("_parameters", "_buffers", "_modules")


@dataclass
class _ModuleState:
    module: nn.Module
    slots: dict[str, dict[str, Any]]  # "_parameters"/"_buffers"/"_modules" -> copy of the dict
    attrs: dict[str, Any]  # every other entry of the module's ``__dict__`` (shallow)


@dataclass
class ModelState:
    """What `transaction` restores: see the module docstring."""

    modules: list[_ModuleState]
    configs: list[tuple[Any, dict[str, Any]]]  # (config object, copy of its __dict__)

    @classmethod
    def capture(cls, model: nn.Module) -> ModelState:
        """Record the objects ``model`` and every submodule hold (no tensor is copied)."""
        mods: list[_ModuleState] = []
        configs: dict[int, tuple[Any, dict[str, Any]]] = {}
        for module in model.modules():
            d = vars(module)
            slots = {s: dict(d[s]) for s in _SLOTS if s in d}
            attrs = {k: v for k, v in d.items() if k not in _SLOTS}
            mods.append(_ModuleState(module, slots, attrs))
            config = d.get("config")
            if config is not None and hasattr(config, "to_dict") and id(config) not in configs:
                configs[id(config)] = (config, _config_dict(config))
        return cls(mods, list(configs.values()))

    def restore(self) -> None:
        """Put every recorded object and attribute back (modules keep their identity)."""
        for ms in self.modules:
            d = vars(ms.module)
            for slot, saved in ms.slots.items():
                d[slot].clear()
                d[slot].update(saved)
            for key in [k for k in d if k not in _SLOTS and k not in ms.attrs]:
                del d[key]
            d.update(ms.attrs)
        self._restore_configs()

    def settings_changed(self) -> bool:
        """Whether a module's scalar setting differs from the recorded one."""
        return any(_setting(key, value) and vars(ms.module).get(key, _MISSING) != value
                   for ms in self.modules for key, value in ms.attrs.items())

    def restore_settings(self) -> None:
        """Put back the scalar settings (widths, head counts, scales, size lists) of every
        module and the configs; parameters, buffers, submodules, hooks and train/eval modes
        stay as they are (an undo puts the tensors back itself)."""
        for ms in self.modules:
            d = vars(ms.module)
            for key, value in ms.attrs.items():
                if _setting(key, value) and d.get(key, _MISSING) != value:
                    d[key] = type(value)(value) if isinstance(value, list) else value
        self._restore_configs()

    def _restore_configs(self) -> None:
        """Every recorded config's fields as they were (fields added since removed)."""
        for config, saved in self.configs:
            d = vars(config)
            for key in [k for k in d if k not in saved]:
                del d[key]
            d.update(saved)


_MISSING = object()


def _setting(key: str, value: object) -> bool:
    """Whether a module attribute is a scalar setting (a width, a head count, a scale, a
    size list) that `ModelState.restore_settings` puts back; the train/eval flag is not."""
    return key != "training" and isinstance(value, (int, float, tuple, list))


def _config_dict(config: Any) -> dict[str, Any]:
    """A copy of a config's attributes; nested sub-configs are copied too."""
    out: dict[str, Any] = {}
    for key, value in vars(config).items():
        if isinstance(value, (dict, list)):
            value = type(value)(value)
        out[key] = value
    return out


@contextmanager
def transaction(model: nn.Module) -> Iterator[ModelState]:
    """Run the body; if it raises (anything, ``KeyboardInterrupt`` included), restore
    ``model`` as it was on entry and re-raise.

    Example:
        >>> with transaction(model):
        ...     apply_removal(model, coupling, removal)
    """
    state = ModelState.capture(model)
    try:
        yield state
    except BaseException:
        state.restore()
        raise


@contextmanager
def left_as_found(model: nn.Module) -> Iterator[ModelState]:
    """Run the body, then restore ``model`` as it was on entry however the body ends: for
    work on the user's model that must not outlive it (an export brings the config in line
    and ``save_pretrained`` writes ``architectures``/``dtype`` into it; the written folder
    keeps them, the user's model does not). The body must not write into tensors in place,
    or must put them back itself.
    """
    state = ModelState.capture(model)
    try:
        yield state
    finally:
        state.restore()
