"""Where the app's model and data come from: a spec, a local checkpoint, uploads, data files.

Streamlit-free: the Model page collects a `LoadRequest`; `load_request` builds the model (in
stages, reporting each to a callback so the page can show progress) and its calibration and
held-out data.
"""
from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..io import defaults
from ..io.data import (
    BUILTIN_TEXT,
    TEXT_SUFFIXES,
    DataError,
    DataOptions,
    check_apart,
    check_text_upload,
    load_data,
    read_texts,
)
from ..io.jsonfile import read_json
from ..io.specs import (
    LoadedModel,
    SpecError,
    hf_families,
    list_demos,
    load_model,
    parse_input_shape,
)
from ..prune.calibration import Calibration


@dataclass(frozen=True)
class LoadRequest:
    """What the Model page asks for."""

    spec: str
    device: str = "cpu"
    shape: str = ""  # "1,3,224,224", blank for the model's default
    weights: str = ""  # a local weights file (also a sharded *.index.json); blank for none
    calibration: str = ""  # .txt / .jsonl / .pt / image folder; blank for random inputs
    heldout: str = ""  # held-out data for quality; blank for none
    num_samples: int = 0  # 0 = every sample
    seq_len: int = 128
    batch_size: int = 8


@dataclass(frozen=True)
class Loaded:
    """A built model and the data the session prunes and measures it with."""

    model: LoadedModel
    calibration: Calibration | None
    heldout: Calibration | None
    importance: str = "magnitude"  # the criterion to start with (`explorer.io.defaults`)
    note: str | None = None  # what was chosen for the user, when they did not say
    heads: str = "dims"  # the head mode to start with (`explorer.io.defaults`)


def spec_for_path(path: str) -> tuple[str, str]:
    """A spec and a weights file for a local path the user typed.

    A transformers checkpoint folder gives ``hf:<folder>``; a timm folder (``config.json``
    with ``architecture``) gives ``timm:<folder>``; a file is a weights file for the current
    spec (returned as ``("", path)``).

    Raises:
        SpecError: if the path does not exist or is a folder without ``config.json``.
    """
    p = Path(path.strip()).expanduser()
    if p.is_file():
        return "", str(p)
    if not p.is_dir():
        raise SpecError(f"local path {str(p)!r} does not exist")
    config = p / "config.json"
    if not config.is_file():
        raise SpecError(f"folder {str(p)!r} has no config.json; give a transformers or timm "
                        "checkpoint folder, or a weights file")
    data = read_json(config, "the folder's config", SpecError)
    timm_style = isinstance(data, dict) and "architecture" in data and "model_type" not in data
    return (f"timm:{p}" if timm_style else f"hf:{p}"), ""


UPLOADS = "pruning-explorer-uploads"  # the folder uploads are saved in, on the server


def typed_path(path: str) -> str:
    """``path`` as the user typed it, or "" for a saved upload (its server path means nothing
    to the user and is not theirs to see)."""
    return "" if UPLOADS in Path(path).parts else path


def save_upload(name: str, data: bytes, directory: str | None = None) -> Path:
    """Write uploaded bytes to a file named by their hash (same upload, same path).

    Args:
        name: the uploaded file's name (its suffix is kept: it tells the file's kind).
        data: the bytes.
        directory: where to write; a folder under the system temp dir by default.
    """
    folder = Path(directory or tempfile.gettempdir()) / UPLOADS
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = folder / f"{digest}{''.join(Path(name).suffixes[-2:])}"
    if not path.exists():
        path.write_bytes(data)
    return path


def load_request(request: LoadRequest, build: Callable[..., LoadedModel] = load_model,
                 progress: Callable[[str], None] | None = None) -> Loaded:
    """Build the model of ``request`` and read its data, reporting each stage to ``progress``.

    Args:
        request: what to load.
        build: ``load_model`` or a cached wrapper of it with the same signature.
        progress: called with a short line before each stage.

    Raises:
        SpecError, DataError: for a bad spec, weights file or data file (one clear line).
    """
    say = progress or (lambda _line: None)
    if request.calibration and request.heldout:
        check_apart(request.calibration, request.heldout)
    shape = parse_input_shape(request.shape) if request.shape.strip() else None
    say(f"building `{request.spec}`" + (f" with weights {request.weights}"
                                        if request.weights else ""))
    lm = build(request.spec.strip(), device=request.device, input_shape=shape,
               weights=request.weights or None)
    options = DataOptions(request.num_samples or None, request.seq_len, request.batch_size)
    calibration = heldout = None
    if request.calibration:
        say(f"reading calibration data {request.calibration}")
        calibration = load_data(request.calibration, lm, options)
    if request.heldout:
        say(f"reading held-out data {request.heldout}")
        heldout = load_data(request.heldout, lm, options)
    chosen = defaults.choose(lm, None, request.calibration or None, request.num_samples or None,
                             weights=request.device != "meta")
    if chosen.calibration == BUILTIN_TEXT:
        say("reading built-in calibration text (paragraphs of Python's reference manual)")
        apart = read_texts(request.heldout) if request.heldout and \
            Path(request.heldout).suffix in TEXT_SUFFIXES else []
        calibration = load_data(BUILTIN_TEXT, lm, options, apart_from=apart)
    return Loaded(lm, calibration, heldout, chosen.importance, chosen.note, chosen.heads)


Upload = tuple[str, bytes]  # (file name, contents) of an uploaded file


def request_from_form(spec: str, device: str = "cpu", shape: str = "", *, path: str = "",
                      weights_upload: Upload | None = None, calibration: str = "",
                      calibration_upload: Upload | None = None, heldout: str = "",
                      heldout_upload: Upload | None = None, num_samples: int = 0,
                      seq_len: int = 128, batch_size: int = 8) -> LoadRequest:
    """The `LoadRequest` for the Model page's fields (an upload wins over a typed path).

    Raises:
        SpecError: if ``path`` does not exist or is a folder with no checkpoint config.
        DataError: if an uploaded text file is over the data file caps (`explorer.io.data`),
            or uploaded data overlap (named by their upload names, not server paths).
    """
    weights = ""
    if path.strip():
        folder_spec, weights = spec_for_path(path)
        spec = folder_spec or spec
    if weights_upload is not None:
        weights = str(save_upload(*weights_upload))
    for upload in (calibration_upload, heldout_upload):
        if upload is not None:
            check_text_upload(*upload)  # the caps of a data file, before anything is saved
    uploaded: dict[str, str] = {}  # a saved upload's server path -> the user's file name
    if calibration_upload is not None:
        calibration = str(save_upload(*calibration_upload))
        uploaded[calibration] = calibration_upload[0]
    if heldout_upload is not None:
        heldout = str(save_upload(*heldout_upload))
        uploaded[heldout] = heldout_upload[0]
    if uploaded and calibration.strip() and heldout.strip():
        try:
            check_apart(calibration.strip(), heldout.strip())
        except DataError as exc:  # said with the names the user chose, not server paths
            text = str(exc)
            for path, name in uploaded.items():
                text = text.replace(repr(path), f"the uploaded {name!r}").replace(
                    path, f"the uploaded {name!r}")
            raise DataError(text) from None
    return LoadRequest(spec.strip(), device, shape, weights, calibration.strip(),
                       heldout.strip(), int(num_samples), int(seq_len), int(batch_size))


FIRST_EXAMPLES = ("demo:dino_vit_safe", "demo:dino_vit")  # the teaching pair, listed first


def example_specs() -> list[str]:
    """The Model page's examples: the DINO pair, every demo, transformers families, timm."""
    demos = [f"demo:{d}" for d in list_demos() if f"demo:{d}" not in FIRST_EXAMPLES]
    return [*FIRST_EXAMPLES, *demos, *(f"hf:{f}" for f in hf_families()),
            "timm:vit_tiny_patch16_224?img_size=64", "timm:resnet18"]


class UploadedFile(Protocol):
    """What an upload widget holds (Streamlit's ``UploadedFile``)."""

    name: str

    def getvalue(self) -> bytes: ...


def _upload(fields: Mapping[str, Any], key: str) -> Upload | None:
    up: UploadedFile | None = fields.get(key)
    return None if up is None else (up.name, up.getvalue())


def request_from_fields(fields: Mapping[str, Any]) -> LoadRequest:
    """`request_from_form` over the Model page's widget values, keyed as on the page
    (``model_spec``, ``model_device``, ``model_shape``, ``model_path``, ``model_upload``,
    ``model_calib`` / ``_up``, ``model_heldout`` / ``_up``, ``model_samples``,
    ``model_seq_len``, ``model_batch``).

    Raises:
        SpecError: as `request_from_form`.
    """
    return request_from_form(
        fields.get("model_spec", ""), fields.get("model_device", "cpu"),
        fields.get("model_shape", ""), path=fields.get("model_path", ""),
        weights_upload=_upload(fields, "model_upload"),
        calibration=fields.get("model_calib", ""),
        calibration_upload=_upload(fields, "model_calib_up"),
        heldout=fields.get("model_heldout", ""),
        heldout_upload=_upload(fields, "model_heldout_up"),
        num_samples=fields.get("model_samples", 0), seq_len=fields.get("model_seq_len", 128),
        batch_size=fields.get("model_batch", 8))


def plan_text(upload: UploadedFile | None, pasted: str) -> bytes | str | None:
    """The plan to apply: an uploaded file wins over pasted text; None when both are empty."""
    if upload is not None:
        return upload.getvalue()
    return pasted if pasted.strip() else None
