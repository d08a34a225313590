"""Weight files read as data: each way a safetensors file or a pickle can be wrong is one
`SpecError` naming the file.

The loaders (``--weights``, ``hf:<folder>``, the offloaded ``--max-memory`` load, a streamed
replay) meet the same broken files: a truncated or garbage safetensors file, a pickle that
names code (refused by ``weights_only=True``: nothing in it runs), a tensor whose shape does
not fit. Those files are checked here before a loader reads them (`check_safetensors`,
`check_folder`) or their loader's error is mapped here (`load_pickle`, `pickle_refusal`,
`mismatch_error`), so a user reads what is wrong with which file, never a library's traceback.
"""
from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..jsonfile import read_json
from ._types import SpecError, one_line

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", re.S)


def check_safetensors(path: Path) -> None:
    """Open ``path``'s header (no weights are read): it must parse and cover the file.

    Raises:
        SpecError: if the file is missing, truncated or not safetensors.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SpecError(f"{str(path)!r} is not a readable safetensors file ({one_line(e)}); "
                        "is it complete? Copy or convert it again") from e


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in a safetensors file, from its header (no weights are
    read). The one reader of headers for the large-model path and the streamed replay.

    Raises:
        safetensors.SafetensorError, OSError: the file is missing or not safetensors (the
            callers say what it means for them).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(int(n) for n in f.get_slice(key).get_shape())
                for key in list(f.keys())}  # safe_open handles are not iterable


def architecture_class(config: Any) -> tuple[Any, Any]:
    """(the architecture a transformers config names, its transformers model class or None
    when transformers has no such ``PreTrainedModel``). Only the name is read: no code of
    the folder is imported."""
    import transformers

    archs = getattr(config, "architectures", None)  # a list, unless hand-edited
    arch = archs[0] if isinstance(archs, list) and archs else archs
    cls: Any = getattr(transformers, arch, None) if isinstance(arch, str) else None
    is_model = isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
    return arch, cls if is_model else None


def weight_files(folder: Path) -> list[Path]:
    """The weight files a transformers folder's index (or single file) names, inside it."""
    for index in INDEX_FILES:
        if (folder / index).is_file():
            data = read_json(folder / index, "the checkpoint index", SpecError)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            names = dict.fromkeys(str(v) for v in (weight_map or {}).values()) \
                if isinstance(weight_map, dict) else {}
            return [folder / n for n in names if Path(n).name == n]  # others: refused elsewhere
    return [folder / n for n in SINGLE_FILES if (folder / n).is_file()]


def check_folder(folder: Path) -> None:
    """Check every safetensors file a transformers folder's weights name (headers only).

    Raises:
        SpecError: naming the first missing, truncated or unreadable file.
    """
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise SpecError(f"weights file {str(path)!r} named by the checkpoint index in "
                                f"{str(folder)!r} does not exist")
            check_safetensors(path)


@contextmanager
def quiet_unpickler() -> Iterator[None]:
    """No warnings from torch's weights-only unpickler (about pickle protocols) in the block:
    a file it refuses is one error line of ours (`pickle_refusal`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning,
                                module=r"torch\._weights_only_unpickler")
        yield


def load_pickle(path: Path, trust: bool) -> Any:
    """``torch.load`` of a pickle as tensors only (unless ``trust``), its warnings silenced.

    Raises:
        SpecError: if the file is not a pickle of tensors (one line: which file, why).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's protocol / weights_only chatter
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if trust:
            raise SpecError(f"cannot unpickle {str(path)!r}: {one_line(e)}") from e
        raise SpecError(pickle_refusal(path, e)) from e
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError ... per cause
        raise SpecError(f"cannot load weights {str(path)!r}: {type(e).__name__}: "
                        f"{one_line(e)}; is it a complete torch.save file?") from e


def pickle_refusal(path: Path | str, error: BaseException) -> str:
    """Why a weights-only load refused ``path`` (a file, or a description of one such as
    ``"a shard of 'DIR'"``), in one line (nothing in it was run)."""
    text = str(error)
    named = _GLOBAL.search(text)
    detail = _UNPICKLER.search(text)
    why = (f"it names {named.group(1)}, which is not a tensor type" if named else
           f"{one_line(Exception(detail.group(1)), 120)}" if detail else one_line(error, 120))
    name = repr(str(path)) if isinstance(path, Path) else path
    return (f"{name} is a pickle that a tensors-only load refuses ({why}); nothing in "
            "it was run. Save the weights as safetensors (or a torch.save-d state dict of "
            "tensors); load a pickle you trust with trust_weights=True")


def pickle_files(folder: Path) -> list[Path]:
    """The pickled weight files of a transformers folder."""
    return [p for p in weight_files(folder) if p.suffix != ".safetensors"]


def mismatch_error(where: Path, mismatched: Iterable[Any]) -> SpecError | None:
    """One error naming the first tensor whose checkpoint shape differs from the model's
    (transformers' ``mismatched_keys``: ``(name, checkpoint shape, model shape)``), or None."""
    items = sorted(mismatched, key=str)
    if not items:
        return None
    first = items[0]
    if isinstance(first, tuple) and len(first) == 3:
        name, theirs, ours = first
        what = f"tensor {str(name)!r} has shape {tuple(theirs)}, the model's is {tuple(ours)}"
    else:
        what = f"tensor {str(first)!r} has another shape than the model's"
    more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
    if (where / "plan.json").is_file():  # an export whose widths no transformers config says
        return SpecError(f"weights in {str(where)!r} do not fit its config: {what}{more}; it is "
                         f"a safetensors + plan export (plan.json: widths that differ between "
                         f"layers, which config.json cannot say): load it with "
                         f"explorer.load_pruned(None, {str(where)!r}), or export with "
                         f"--allocation uniform for a from_pretrained folder")
    return SpecError(f"weights in {str(where)!r} do not fit its config: {what}{more}; check "
                     "that config.json is the one saved with these weights")
