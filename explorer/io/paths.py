"""Paths that files name, and folders the explorer writes: the one home of both checks.

* `inside`: a path read from a file (a shard in an index's ``weight_map``, a session log in
  its folder) is data. It must be a relative name that stays inside the folder it is read
  from, symlinks resolved; absolute names, ``..``, links out and names that are no file
  names are refused in one line naming the file that holds them. The one exception is the
  Hugging Face cache layout, whose snapshot folders (``<repo>/snapshots/<rev>/``) hold links
  into the repository's own ``blobs/``.
* `shard_files`: the shards a sharded checkpoint's ``*.index.json`` names, each checked by
  `inside` (every index reader uses it: ``--weights``, ``hf:FOLDER``, streamed replay,
  `explorer.load_pruned`).
* `check_out_apart`: every folder (or file) the explorer writes is neither a source it reads
  (checkpoint folder, weights, plan, data) nor inside a source folder, nor holds a source, so
  ``--force`` can never replace what is being read.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePath

from .jsonfile import read_json

__all__ = ["PathError", "check_out_apart", "inside", "shard_files"]

MAX_NAME = 255  # bytes of one file name on common file systems
MAX_INDEX_BYTES = 64 * 2**20  # a sharded index names tensors and files: far below this
SHARD_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # what a shard may be


class PathError(ValueError):
    """A path named by a file leaves its folder, or a write would touch a source."""


def _roots(folder: Path) -> list[Path]:
    """Where files named in ``folder`` may resolve to: the folder, and for a Hugging Face
    cache snapshot (``.../snapshots/<rev>``) its repository's ``blobs/``."""
    real = folder.resolve()
    roots = [real]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def inside(folder: Path, name: object, source: Path, what: str = "file",
           error: type[Exception] = PathError) -> Path:
    """``folder / name``, after checking that ``name`` (read from ``source``) stays inside.

    Args:
        folder: the folder the name is relative to (usually ``source``'s).
        name: the value read from the file.
        source: the file that holds the name, for the message.
        what: what the name is ("shard"), for the message.
        error: the exception class to raise (the caller's error type).

    Raises:
        error: ``name`` is not a string naming a relative path, climbs out with ``..``, or
            resolves (through a symlink) outside ``folder``.
    """
    if not isinstance(name, str) or not name or "\x00" in name or \
            any(len(p.encode("utf-8", "surrogatepass")) > MAX_NAME for p in name.split("/")):
        shown = repr(name)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise error(f"'{source}' names {what} {shown}, which is not a file name; it must "
                    f"name a file inside '{folder}'")
    rel = PurePath(name)
    if rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise error(f"'{source}' names {what} '{name}', outside its folder '{folder}'; "
                    f"the explorer reads only files inside it (nothing was read or written)")
    path = folder / rel
    real = path.resolve()
    if not any(real == root or real.is_relative_to(root) for root in _roots(folder)):
        raise error(f"'{source}' names {what} '{name}', a link to '{real}' outside its folder "
                    f"'{folder}'; the explorer reads only files inside it (nothing was read "
                    f"or written)")
    return path


def shard_files(index: Path, error: type[Exception] = PathError) -> dict[str, Path]:
    """Shard file name -> path, for every shard a checkpoint index's ``weight_map`` names
    (in first-seen order), each a plain file name of a weights file inside the index's folder.

    Raises:
        error: the index is unreadable, too big, has no ``weight_map`` object of names, or a
            name that is not a weights file in the folder (see `inside`), or is missing.
    """
    data = read_json(index, "the checkpoint index", error, MAX_INDEX_BYTES)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise error(f"checkpoint index '{index}' has no 'weight_map' object; give the "
                    f"index.json written by save_pretrained next to its shards")
    shards: dict[str, Path] = {}
    for name in weight_map.values():
        if isinstance(name, str) and name in shards:
            continue
        path = inside(index.parent, name, index, "shard", error)
        name = str(name)  # `inside` refused everything but a string
        if PurePath(name).name != name or not name.endswith(SHARD_SUFFIXES):
            raise error(f"'{index}' names shard '{name}', which is not the file name of a "
                        f"weights file ({', '.join(SHARD_SUFFIXES)}) in '{index.parent}'")
        if not path.is_file():
            raise error(f"'{index}' names shard '{name}', which is not a file in "
                        f"'{index.parent}'; copy the whole checkpoint folder")
        shards[name] = path
    return shards


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or inner.is_relative_to(outer)


def check_out_apart(out: str | os.PathLike[str], sources: Iterable[str | os.PathLike[str]],
                    error: type[Exception] = PathError, what: str = "--out") -> None:
    """Refuse to write ``out`` where it would touch something the run reads.

    ``out`` (a folder or a file to be written) must not be a source, nor lie inside a source
    folder, nor hold a source (a folder written with ``--force`` replaces its content).
    Symlinks are resolved; sources that do not exist are skipped.

    Raises:
        error: one line naming ``out`` and the source.
    """
    target = Path(out).resolve()
    for src in sources:
        if not os.path.exists(src):
            continue
        real = Path(src).resolve()
        if target == real:
            raise error(f"{what} '{out}' is '{src}', which this run reads; write to a new "
                        f"folder outside it")
        if real.is_dir() and _contains(real, target):
            raise error(f"{what} '{out}' is inside '{src}', which this run reads; write to a "
                        f"folder outside it")
        if _contains(target, real):
            raise error(f"{what} '{out}' holds '{src}', which this run reads; write to a folder "
                        f"that does not contain it")
