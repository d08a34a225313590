"""sentence-transformers folders: a transformers encoder plus pooling and normalisation.

A sentence-transformers checkpoint is a transformers folder (``config.json``, weights,
tokenizer) with ``modules.json`` listing the pipeline: ``Transformer`` (the encoder, at the
folder's root), ``Pooling`` (``1_Pooling/config.json``: which pooling) and often
``Normalize`` (``2_Normalize/``, no files). Its ``config.json`` may name a masked-LM class
(``MPNetForMaskedLM``) whose head the folder does not hold: the model to prune is the
encoder, and its quality is the cosine of the pooled, normalised embedding (normalising
changes no cosine; mean pooling over real tokens is `explorer.quality.evaluate`'s encoder
measure, the first token's state its ``encoder-cls`` one).

The files are read as data, structurally: ``modules.json`` must be a list of modules of
``sentence_transformers.models`` with relative paths inside the folder; nothing is imported
(the ``sentence-transformers`` package need not be installed). An export copies them next to
the pruned weights, with the pooling's embedding width set to the pruned hidden size, so
``SentenceTransformer(folder)`` loads it.
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from ..jsonfile import read_json
from ..paths import inside
from ._types import SentenceFolder, SpecError

__all__ = ["SentenceFolder", "read_sentence_folder", "write_sentence_files"]

MODULES = "modules.json"
_PACKAGE = "sentence_transformers.models."
_KNOWN = ("Transformer", "Pooling", "Normalize")  # the pipelines an export can carry over
_SETTINGS = ("sentence_bert_config.json", "config_sentence_transformers.json")
_MAX_BYTES = 1 << 20  # a settings file is a few hundred bytes; a bigger one is not one


def _read_json(file: Path, what: str) -> Any:
    return read_json(file, what, SpecError, _MAX_BYTES,
                     "; is it a sentence-transformers folder?")


def read_sentence_folder(folder: Path) -> SentenceFolder | None:
    """The sentence-transformers pipeline of ``folder``, or None without ``modules.json``.

    Raises:
        SpecError: ``modules.json`` is not a list of sentence-transformers modules with
            relative paths, or the encoder is not at the folder's root.
    """
    file = folder / MODULES
    if not file.is_file():
        return None
    data = _read_json(file, "sentence-transformers module list")
    where = f"'{file}'"
    if not isinstance(data, list) or not data:
        raise SpecError(f"{where} is not a list of modules; is it a sentence-transformers "
                        f"folder?")
    modules: list[tuple[str, str, str]] = []
    for entry in data:
        kind = entry.get("type") if isinstance(entry, dict) else None
        path = entry.get("path", "") if isinstance(entry, dict) else None
        if not isinstance(kind, str) or not kind.startswith(_PACKAGE) or \
                not isinstance(path, str) or PurePosixPath(path).is_absolute() or \
                ".." in PurePosixPath(path).parts or "\\" in path or \
                (kind != _PACKAGE + "Transformer" and path in ("", ".")):
            raise SpecError(f"{where} lists {entry!r}, which is not a sentence-transformers "
                            f"module with a path inside the folder")
        modules.append((str(entry.get("name", len(modules))), path,
                        kind.removeprefix(_PACKAGE)))
    encoder = next((m for m in modules if m[2] == "Transformer"), None)
    if encoder is None or encoder[1] not in ("", "."):
        at = f"'{encoder[1]}'" if encoder else "nowhere"
        raise SpecError(f"{where} puts the transformers encoder at {at}; load that folder "
                        f"instead (hf:{folder / encoder[1]})" if encoder else
                        f"{where} lists no Transformer module; it is not an encoder folder")
    pooling: dict[str, Any] = {}
    pool = next((m for m in modules if m[2] == "Pooling"), None)
    if pool is not None and (folder / pool[1] / "config.json").is_file():
        # read only inside the folder: a pooling folder that links out is refused
        config = inside(folder, f"{pool[1]}/config.json", file, "pooling config", SpecError)
        found = _read_json(config, "pooling config")
        pooling = found if isinstance(found, dict) else {}
    unknown = [kind for _n, _p, kind in modules if kind not in _KNOWN]
    supported = "" if not unknown else (
        f"its pipeline has {', '.join(unknown)} after the encoder, which an export does not "
        f"carry over")
    return SentenceFolder(str(folder), tuple(modules), tuple(pooling.items()), supported)


def write_sentence_files(sentence: SentenceFolder, out: Path, hidden_size: int | None
                         ) -> list[str]:
    """Copy the pipeline's files into the exported folder ``out`` (the pruned encoder's
    ``save_pretrained`` folder); the pooling's ``word_embedding_dimension`` becomes
    ``hidden_size``. Returns the files written."""
    src = Path(sentence.folder)
    written: list[str] = []

    def put(rel: str, data: Any) -> None:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        written.append(str(target))

    put(MODULES, [{"idx": i, "name": name, "path": path, "type": _PACKAGE + kind}
                  for i, (name, path, kind) in enumerate(sentence.modules)])
    for name in _SETTINGS:
        if (src / name).is_file():
            put(name, _read_json(src / name, "sentence-transformers settings"))
    for _name, path, kind in sentence.modules:
        if kind == "Pooling":
            pooling = dict(sentence.pooling)
            if hidden_size is not None:
                pooling["word_embedding_dimension"] = int(hidden_size)
            put(f"{path}/config.json", pooling)
        elif kind == "Normalize":
            (out / path).mkdir(parents=True, exist_ok=True)
            written.append(str(out / path))
    return written
