"""``hf:<file.gguf>`` and ``hf:<folder>?gguf_file=NAME``: a community GGUF checkpoint.

GGUF is llama.cpp's single-file format (weights, often block-quantized, plus the config and
the tokenizer). transformers reads it itself (``from_pretrained(folder, gguf_file=name)``,
dequantized to float32, local files only, no remote code); the model is then rebuilt from its
config without ``quantization_config`` (sharing the dequantized tensors), so it prunes,
saves and exports as a plain model with safetensors, like any transformers folder.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...quality.task import ModelKind, Task
from ..own_code import refuse_own_code
from ..quiet import quiet_transformers
from ._hf_folder import AUTO_CLASS, KIND, choose_task, example_inputs
from ._types import Built, ModelFamily, SpecError, one_line

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def gguf_target(name: str, options: dict[str, Any]) -> tuple[Path, str] | None:
    """``(folder, file name)`` when the spec names a GGUF file (``options`` loses its
    ``gguf_file``), else None.

    Raises:
        SpecError: if the GGUF file does not exist or is not a GGUF file.
    """
    requested = options.pop("gguf_file", None)
    if requested is None and not name.lower().endswith(".gguf"):
        return None
    path = Path(name) / str(requested) if requested is not None else Path(name)
    if requested is not None and (Path(str(requested)).name != str(requested)
                                  or not Path(name).is_dir()):
        raise SpecError(f"gguf_file={requested!r} must name a file inside the folder "
                        f"{name!r} (hf:FOLDER?gguf_file=NAME.gguf)")
    if not path.is_file():
        raise SpecError(f"GGUF file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SpecError(f"cannot read GGUF file {str(path)!r}: {e.strerror or e}") from e
    if magic != GGUF_MAGIC:
        raise SpecError(f"{str(path)!r} is not a GGUF file (it does not start with 'GGUF'); "
                        "give a llama.cpp .gguf checkpoint")
    return path.parent, path.name


def build_gguf(folder: Path, name: str, overrides: dict[str, Any], requested_task: Any,
               attn: str, device: str) -> Built:
    """The model of a GGUF file, dequantized, with its tokenizer.

    Raises:
        SpecError: if transformers cannot read the file (corrupt, unsupported architecture).
    """
    import transformers

    where = f"GGUF file {str(folder / name)!r}"
    refuse_own_code(folder, SpecError)  # its tokenizer configs are read too
    # llama.cpp files hold decoders and name no architecture class: causal LM unless asked
    task = choose_task(None, requested_task, where) if requested_task is not None \
        else Task.CAUSAL_LM
    auto_cls = getattr(transformers, AUTO_CLASS[task])
    on_meta = torch.device(device).type == "meta"
    loaded: nn.Module | None = None
    try:  # one read of the file: the config comes with the weights (each read is slow)
        with quiet_transformers(stderr=True):  # its reader draws a tqdm bar of its own
            if on_meta:
                config = transformers.AutoConfig.from_pretrained(
                    str(folder), gguf_file=name, local_files_only=True,
                    trust_remote_code=False)
            else:
                loaded = auto_cls.from_pretrained(str(folder), gguf_file=name,
                                                  local_files_only=True,
                                                  trust_remote_code=False)
                config = copy.deepcopy(loaded.config)
    except Exception as e:  # noqa: BLE001 - the gguf reader raises many types on bad files
        raise SpecError(f"cannot read the {where} as {auto_cls.__name__}: "
                        f"{type(e).__name__}: {one_line(e)}{_what_to_do(e)}") from e
    _plain(config)
    for key, value in {**overrides, "use_cache": False}.items():
        if not hasattr(config, key):
            raise SpecError(f"{config.model_type} config of the {where} has no field {key!r}")
        setattr(config, key, value)
    try:
        with torch.device("meta"):
            model = auto_cls.from_config(config, attn_implementation=attn,
                                         trust_remote_code=False)
        if loaded is not None:
            model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
            _take_buffers(model, loaded)
            model.tie_weights()
            model.to(device)
    except (RuntimeError, ValueError, KeyError) as e:
        raise SpecError(f"cannot rebuild the model of the {where} without its quantization "
                        f"settings: {type(e).__name__}: {one_line(e)}") from e
    finally:
        del loaded
    tokenizer = _tokenizer(folder, name)
    inputs = example_inputs(model, config, task, tokenizer)
    vocab = getattr(config, "vocab_size", None)
    return Built(model, inputs, ModelFamily.HF, KIND.get(task, ModelKind.ENCODER), hf_config=config,
                 vocab_size=int(vocab) if vocab else None, task=task, tokenizer=tokenizer,
                 source=str(folder / name), pretrained=not on_meta,
                 notes=(f"{name}: GGUF weights dequantized to float32 by transformers; "
                        "exports are plain safetensors",))


def _what_to_do(error: Exception) -> str:
    """For an architecture transformers does not read from GGUF: which it reads, and the
    way around (a transformers folder of the same model)."""
    if "not supported" not in str(error):
        return ""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # moved in another transformers version: no list, same advice
        readable = ""
    else:
        names = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general",
                                                                            "tokenizer"))
        readable = f" (transformers reads GGUF files of {', '.join(names)})"
    return f"{readable}; give this model as a transformers folder instead (hf:FOLDER)"


def _take_buffers(model: nn.Module, loaded: nn.Module) -> None:
    """Buffers the state dict does not carry (rotary frequencies), from the loaded model."""
    for name, buf in loaded.named_buffers():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        mine = module._buffers.get(attr)
        if mine is not None and mine.device.type == "meta":
            module._buffers[attr] = buf


def _plain(config: Any) -> None:
    """Drop the GGUF quantization settings, so the model saves as plain float weights."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def _tokenizer(folder: Path, name: str) -> Any | None:
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder), gguf_file=name,
                                                 local_files_only=True,
                                                 trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - as above
        raise SpecError(f"cannot read the tokenizer of GGUF file {str(folder / name)!r}: "
                        f"{type(e).__name__}: {one_line(e)}") from e

