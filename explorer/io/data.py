"""Real data for calibration and evaluation: text, JSON lines, image folders, tensor files.

* ``.txt``: one sample per line (blank lines skipped); ``.jsonl``: one JSON object per line with
  a ``text`` field. Tokenized with the model's own tokenizer, truncated to ``seq_len``, padded
  on the right within each batch; the padding mask travels with every batch as the model's
  ``attention_mask`` (`Calibration.mask_index` says where), so padded tokens change nothing.
* a folder of images (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``, searched
  recursively, sorted by path), transformed with the model's own data config (timm's
  ``resolve_data_config``) into ``(batch, 3, H, W)`` tensors.
* ``.pt``: a tensor, a tuple of tensors or a list of batches, loaded with ``weights_only=True``.

Calibration and evaluation data must be different samples: `split_samples` cuts one set in
two, and `check_apart` refuses two sources that share a sample.

``builtin:python-manual`` (`BUILTIN_TEXT`) is real English prose every Python install ships:
the paragraphs of Python's reference manual (``pydoc_data.topics``), in a fixed order. It is
what a data-aware criterion reads on a language model when no calibration file is given
(`builtin_texts`); paragraphs sharing a run of words with the evaluation text are left out.

Data files are untrusted input, so the work they cause is bounded: a text file of more than
`MAX_TEXT_BYTES` or a line of more than `MAX_LINE_CHARS` is refused (file, line, limit), only
the first ``seq_len * CHARS_PER_TOKEN`` characters of a sample reach the tokenizer (grown
where that many characters give fewer tokens than the sample keeps, so the kept tokens are
those of the whole line), JSON nested deeper than Python reads is one error, and an image
PIL calls a decompression bomb (even in the range where it only warns) is refused.
"""
from __future__ import annotations

import inspect
import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..prune.calibration import Calibration, load_calibration
from .specs import LoadedModel

TEXT_SUFFIXES = (".txt", ".jsonl")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_TEXT_BYTES = 1 << 30  # a text or JSON-lines file: 1 GiB (it is read whole)
MAX_LINE_CHARS = 1_000_000  # one sample: far more than any seq_len keeps (~4 chars a token)
CHARS_PER_TOKEN = 32  # characters of a sample tokenized per token kept, at first
_CUT_MARGIN = 16  # tokens past seq_len a cut sample must still give (the cut moves only those)


BUILTIN_TEXT = "builtin:python-manual"  # Python's reference manual, shipped with Python
BUILTIN_SAMPLES = 64  # paragraphs of it read when no sample count is given
_MIN_PARAGRAPH = 200  # characters: shorter blocks are headings and grammar lines
_SHINGLE = 8  # words: a paragraph sharing a run this long with held-out text is left out


class DataError(ValueError):
    """A data file or folder the user gave cannot be used; the message says why and where."""


@dataclass(frozen=True)
class DataOptions:
    """How much data to read and how to batch it."""

    num_samples: int | None = None  # first N samples of the source; None = all of them
    seq_len: int = 128  # text: tokens per sample at most (longer samples are truncated)
    batch_size: int = 8  # samples per forward

    def __post_init__(self) -> None:
        if self.num_samples is not None and self.num_samples < 1:
            raise DataError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.seq_len < 2:
            raise DataError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {self.batch_size}")


def load_data(source: str | Path, lm: LoadedModel, options: DataOptions | None = None, *,
              tokenizer: Any | None = None, apart_from: Sequence[str] = ()) -> Calibration:
    """Batches for ``lm`` from a text, JSON-lines, image-folder or tensor source.

    Args:
        source: a ``.txt`` / ``.jsonl`` file, an image folder, a ``.pt`` tensor file or
            `BUILTIN_TEXT` (`BUILTIN_SAMPLES` paragraphs unless ``options`` say how many).
        lm: the loaded model (its tokenizer, model and example inputs are used).
        options: sample count, sequence length and batch size (defaults: `DataOptions()`).
        tokenizer: a tokenizer to use instead of ``lm.tokenizer``.
        apart_from: held-out texts the built-in text must share no run of words with.

    Returns:
        A `Calibration` (usable for calibration and for `explorer.evaluate`).

    Raises:
        DataError: if the source is missing, empty, malformed or does not suit the model.
    """
    opts = options or DataOptions()
    if str(source) == BUILTIN_TEXT:
        tok = tokenizer if tokenizer is not None else lm.tokenizer
        if tok is None:
            raise DataError(f"{BUILTIN_TEXT} is text, but {lm.spec!r} has no tokenizer; give "
                            f"token ids as a .pt tensor file")
        texts = builtin_texts(apart_from)[: opts.num_samples or BUILTIN_SAMPLES]
        return text_data(texts, tok, lm.model, opts)
    path = Path(source)
    if path.is_dir():
        images = read_image_paths(path)[: opts.num_samples]
        return image_data(images, lm.model, opts.batch_size, lm.example_inputs)
    if not path.is_file():
        raise DataError(f"data source {str(path)!r} does not exist")
    if path.suffix in TEXT_SUFFIXES:
        tok = tokenizer if tokenizer is not None else lm.tokenizer
        if tok is None:
            raise DataError(f"{str(path)!r} is text, but {lm.spec!r} has no tokenizer; load a "
                            "transformers folder with its tokenizer files (hf:<folder>) or "
                            "give token ids as a .pt tensor file")
        texts = read_texts(path)[: opts.num_samples]
        return text_data(texts, tok, lm.model, opts)
    if path.suffix in (".pt", ".pth"):
        try:
            calib = load_calibration(path, lm.example_inputs)
        except (ValueError, RuntimeError, OSError) as e:
            raise DataError(f"cannot read tensor data {str(path)!r}: {e}") from e
        calib.batches = calib.batches[: opts.num_samples]
        return calib
    raise DataError(f"data source {str(path)!r} is not a .txt, .jsonl or .pt file or an image "
                    "folder")


def read_texts(path: str | Path) -> list[str]:
    """The samples of a ``.txt`` (one per line) or ``.jsonl`` (``text`` field) file.

    Raises:
        DataError: if the file is unreadable, a JSON line has no string ``text``, or there is
            no sample at all.
    """
    file = Path(path)
    try:
        _check_size(file.stat().st_size, str(file))
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {str(file)!r}: {e}") from e
    _check_lines(lines, str(file))
    if file.suffix == ".jsonl":
        texts = [_jsonl_text(line, file, i) for i, line in enumerate(lines, 1) if line.strip()]
    else:
        texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DataError(f"{str(file)!r} holds no samples (one per line)")
    return texts


def builtin_texts(apart_from: Sequence[str] = ()) -> list[str]:
    """The paragraphs of Python's reference manual (`BUILTIN_TEXT`), one sample each, in a
    fixed shuffled order (topics mixed); none shares a run of `_SHINGLE` words with any text
    of ``apart_from`` (held-out data drawn from the same manual stays held out).

    Raises:
        DataError: if this Python ships without ``pydoc_data``, or nothing is left.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise DataError(f"{BUILTIN_TEXT}: this Python has no pydoc_data (its reference "
                        f"manual); give --calibration FILE") from e
    paragraphs = list(dict.fromkeys(
        text for name in sorted(topics) for block in topics[name].split("\n\n")
        if len(text := " ".join(block.split())) >= _MIN_PARAGRAPH))
    random.Random(0).shuffle(paragraphs)
    held = {run for text in apart_from for run in _runs(text)}
    kept = [p for p in paragraphs if held.isdisjoint(_runs(p))]
    if not kept:
        raise DataError(f"every paragraph of {BUILTIN_TEXT} is in the evaluation data; give "
                        f"--calibration FILE")
    return kept


def _runs(text: str) -> set[tuple[str, ...]]:
    """Every run of `_SHINGLE` consecutive words of ``text`` (the whole text if shorter)."""
    words = text.split()
    return {tuple(words[i:i + _SHINGLE]) for i in range(max(1, len(words) - _SHINGLE + 1))}


def check_text_upload(name: str, data: bytes) -> None:
    """Apply the text file caps to uploaded bytes before they are saved (named as uploaded).

    Raises:
        DataError: if ``name`` is a text file over `MAX_TEXT_BYTES` or with a line over
            `MAX_LINE_CHARS`.
    """
    if Path(name).suffix not in TEXT_SUFFIXES:
        return
    _check_size(len(data), name)
    _check_lines(data.decode("utf-8", errors="replace").splitlines(), name)


def _check_size(size: int, name: str) -> None:
    if size > MAX_TEXT_BYTES:
        raise DataError(f"{name!r} is {size:,} bytes, over the limit of {MAX_TEXT_BYTES:,} "
                        "for a text data file; use a sample of it (calibration needs a few "
                        "hundred lines)")


def _check_lines(lines: Sequence[str], name: str) -> None:
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE_CHARS:
            raise DataError(f"{name}:{number} is {len(line):,} characters long, over the "
                            f"limit of {MAX_LINE_CHARS:,} for one sample; split it into "
                            "samples of a paragraph or so, one per line")


def _jsonl_text(line: str, file: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except RecursionError as e:
        raise DataError(f"{file}:{number} nests JSON deeper than Python reads; give each "
                        'line as an object like {"text": "..."}') from e
    except ValueError as e:  # JSONDecodeError, and integers of more digits than int() takes
        raise DataError(f"{file}:{number} is not valid JSON: {e}") from e
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{file}:{number} has no non-empty string field 'text'")
    return text.strip()


def text_data(texts: Sequence[str], tokenizer: Any, model: nn.Module,
              options: DataOptions | None = None) -> Calibration:
    """Tokenize ``texts`` into right-padded batches carrying their padding mask.

    The mask is placed where ``model.forward`` takes ``attention_mask`` (positionally, so every
    caller that runs ``model(*batch)`` honours it).

    Raises:
        DataError: if there is no text, or padding is needed and the model takes no mask.
    """
    opts = options or DataOptions()
    if not texts:
        raise DataError("no text samples to tokenize")
    encoded = tokenizer([_head(t, tokenizer, opts.seq_len) for t in texts], truncation=True,
                        max_length=opts.seq_len)["input_ids"]
    pad_id = _pad_id(tokenizer)
    slot = _mask_slot(model)
    batches: list[tuple[Any, ...]] = []
    for start in range(0, len(encoded), opts.batch_size):
        rows = [list(r) for r in encoded[start:start + opts.batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows],
                            dtype=torch.long)
        if slot is None:
            if not bool(mask.all()):
                raise DataError(f"{type(model).__name__}.forward takes no attention_mask, so "
                                "texts of different lengths cannot be batched; use "
                                "batch_size=1")
            batches.append((ids,))
        else:
            batches.append((ids, *([None] * (slot - 1)), mask))
    return Calibration(batches, mask_index=slot)


def _head(text: str, tokenizer: Any, seq_len: int) -> str:
    """The start of ``text`` that gives the same first ``seq_len`` tokens as all of it (the
    end, for a tokenizer that truncates on the left).

    Tokenizing a whole long line to keep ``seq_len`` tokens of it costs time and memory in
    its length (a 20 MB line: minutes and gigabytes). A cut changes at most the few tokens
    next to it, so a start of ``seq_len * CHARS_PER_TOKEN`` characters is enough when it
    still gives `_CUT_MARGIN` tokens more than are kept; where it does not (very long
    tokens), four times as many characters are tried, up to the whole text.
    """
    left = getattr(tokenizer, "truncation_side", "right") == "left"  # keeps the last tokens
    budget = seq_len * CHARS_PER_TOKEN
    while len(text) > budget:
        part = text[-budget:] if left else text[:budget]
        if len(tokenizer(part, add_special_tokens=False)["input_ids"]) >= seq_len + _CUT_MARGIN:
            return part
        budget *= 4
    return text


def _pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its end-of-sequence id, else 0 (masked out either way)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _mask_slot(model: nn.Module) -> int | None:
    """Positional index of ``attention_mask`` in ``model.forward``, if it can be given so."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for i, p in enumerate(params):
        if p.kind not in positional:
            return None
        if p.name == "attention_mask":
            return i if i > 0 else None
    return None


def read_image_paths(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by path.

    Raises:
        DataError: if there is none.
    """
    root = Path(folder)
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and p.is_file())
    if not paths:
        raise DataError(f"{str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def image_data(paths: Sequence[Path], model: nn.Module, batch_size: int = 8,
               example_inputs: tuple[Any, ...] = ()) -> Calibration:
    """Images transformed with the model's data config (timm ``resolve_data_config``; the
    example input's size for other models), in batches.

    Raises:
        DataError: if an image cannot be read.
    """
    from PIL import Image, UnidentifiedImageError
    from timm.data.config import resolve_data_config
    from timm.data.transforms_factory import create_transform

    args: dict[str, Any] = {}
    first = example_inputs[0] if example_inputs else None
    if isinstance(first, torch.Tensor) and first.dim() == 4:
        args["input_size"] = tuple(int(s) for s in first.shape[1:])
    config = resolve_data_config(args, model=model)  # type: ignore[no-untyped-call]  # timm
    transform = create_transform(**config)
    tensors = []
    for path in paths:
        try:
            with warnings.catch_warnings():  # PIL only warns between 1x and 2x its limit
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    tensors.append(transform(image.convert("RGB")))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(f"image {str(path)!r} is refused as a possible decompression bomb "
                            f"({e}); resize it below {Image.MAX_IMAGE_PIXELS:,} pixels") from e
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"cannot read image {str(path)!r}: {e}") from e
    batches: list[tuple[Any, ...]] = [(torch.stack(tensors[i:i + batch_size]),)
                                      for i in range(0, len(tensors), batch_size)]
    return Calibration(batches)


def split_samples(samples: Sequence[str], heldout: float = 0.2,
                  seed: int = 0) -> tuple[list[str], list[str]]:
    """Cut one sample list into calibration and held-out parts (a seeded shuffle; duplicates
    of a sample all go to the same side, so the two parts never share a sample).

    Raises:
        DataError: if ``heldout`` is not in (0, 1) or either part would be empty.
    """
    if not 0.0 < heldout < 1.0:
        raise DataError(f"heldout must be a fraction in (0, 1), got {heldout}")
    unique = list(dict.fromkeys(samples))
    random.Random(seed).shuffle(unique)
    n_eval = round(len(unique) * heldout)
    if n_eval == 0 or n_eval == len(unique):
        raise DataError(f"cannot split {len(unique)} distinct samples {heldout:.0%} held out: "
                        "one side would be empty")
    held = set(unique[:n_eval])
    return [s for s in samples if s not in held], [s for s in samples if s in held]


def check_apart(calibration: str | Path, evaluation: str | Path) -> None:
    """Refuse evaluation data that shares a sample with the calibration data.

    Raises:
        DataError: if both are the same file or folder, or share a text sample or an image.
    """
    if BUILTIN_TEXT in (str(calibration), str(evaluation)):
        return  # the built-in text leaves out what it shares with the other (`builtin_texts`)
    a, b = Path(calibration), Path(evaluation)
    if a.resolve() == b.resolve():
        raise DataError(f"calibration and evaluation data are the same ({str(a)!r}); hold "
                        "out other samples for evaluation (see explorer.io.data.split_samples)")
    if a.is_dir() and b.is_dir():
        names = {p.resolve() for p in read_image_paths(a)}
        shared_paths = [p for p in read_image_paths(b) if p.resolve() in names]
        if shared_paths:
            raise DataError(f"{len(shared_paths)} image(s) are both calibration and evaluation "
                            f"data, first {str(shared_paths[0])!r}")
        return
    if a.suffix in TEXT_SUFFIXES and b.suffix in TEXT_SUFFIXES:
        seen = set(read_texts(a))
        shared = [t for t in read_texts(b) if t in seen]
        if shared:
            raise DataError(f"{len(shared)} sample(s) of {str(b)!r} are also calibration "
                            f"samples in {str(a)!r}, first {shared[0][:60]!r}; evaluate on "
                            "held-out text")
