"""Refit weights beside a plan: the tensors a reconstruction refit after the cuts.

A plan records structure (`explorer.io.plan`); ``--compensate lstsq`` also changes the values
of the layers that read removed channels, and on the large-model path (``prune --device meta
--max-memory ... --plan FILE``) there is no model in memory to export them from. They go into
one safetensors file beside the plan (``FILE`` without ``.json`` + `SUFFIX`), which the plan
names with its sha256 (`explorer.io.plan.Refit`); ``replay --checkpoint`` and ``replay
--model`` read it back.

* `RefitWriter`: the large-model path hands it each decoder layer's refit tensors as that
  layer is done; they wait on disk (one file per layer) and `RefitWriter.finish` joins them
  into the final file one tensor at a time, so memory holds one layer's tensors at most.
* `check_refit`: the file a plan names, read as untrusted data: a plain file name inside the
  plan's folder (`explorer.io.paths.inside`), the recorded sha256, a safetensors header
  holding exactly the plan's refit tensors with their shapes, floating dtypes. No pickle.
* `read_refit`: the values, after `check_refit` (the in-memory replay passes them to
  `explorer.io.plan.Plan.apply`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .paths import inside
from .plan import Plan, PlanError

SUFFIX = ".refit.safetensors"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # bytes per element
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # the dtypes a refit value may have


def header_entry(dtype: str, shape: list[int], offset: int) -> tuple[dict[str, object], int]:
    """A safetensors header entry for a tensor whose data starts ``offset`` bytes after the
    header, and the offset where the next one starts."""
    end = offset + DTYPE_BYTES[dtype] * math.prod(shape)
    return {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}, end
_CHUNK = 2**20

__all__ = ["SUFFIX", "RefitWriter", "check_refit", "read_refit", "refit_file"]


def refit_file(plan_file: str | os.PathLike[str]) -> Path:
    """Where the refit tensors of the plan written to ``plan_file`` go (beside it)."""
    path = Path(plan_file)
    stem = path.name[:-len(".json")] if path.name.endswith(".json") else path.name
    return path.with_name(stem + SUFFIX)


class RefitWriter:
    """Collects refit tensors layer by layer on disk; `finish` writes the one file.

    Use as a context manager: the parts folder (under ``work``) is removed on leaving.
    """

    def __init__(self, work: str | os.PathLike[str] | None = None) -> None:
        self._work = work
        self._dir: Path | None = None
        self.parts: list[Path] = []
        self.shapes: dict[str, tuple[int, ...]] = {}

    def __enter__(self) -> RefitWriter:
        if self._work is not None:
            Path(self._work).mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix="refit-", dir=self._work))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keep ``tensors`` (one layer's) on disk until `finish`."""
        from safetensors.torch import save_file

        if not tensors:
            return
        assert self._dir is not None, "use RefitWriter as a context manager"
        again = sorted(set(tensors) & set(self.shapes))
        if again:
            raise ValueError(f"refit tensor '{again[0]}' was given twice")
        part = self._dir / f"{len(self.parts)}.safetensors"
        save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(part))
        self.parts.append(part)
        self.shapes.update({n: tuple(t.shape) for n, t in tensors.items()})

    def finish(self, target: str | os.PathLike[str]) -> str:
        """Write every tensor kept so far to ``target`` (atomically, sorted by name); the
        file's sha256. Memory: one tensor at a time."""
        from safetensors import safe_open

        where: dict[str, Path] = {}
        entries: dict[str, dict[str, object]] = {}
        offset = 0
        for part in self.parts:
            with safe_open(str(part), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    where[name] = part
        for name in sorted(where):
            with safe_open(str(where[name]), framework="pt") as f:
                sl = f.get_slice(name)
                dtype, shape = sl.get_dtype(), [int(x) for x in sl.get_shape()]
            entries[name], offset = header_entry(dtype, shape, offset)
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        out = Path(target)
        tmp = out.with_name(out.name + ".tmp")
        tmp.unlink(missing_ok=True)  # never write through a link left there
        digest = hashlib.sha256()
        with open(tmp, "xb") as fh:
            for chunk in (len(header).to_bytes(8, "little"), header):
                fh.write(chunk)
                digest.update(chunk)
            for name in sorted(entries):
                with safe_open(str(where[name]), framework="pt") as f:
                    data = f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8)
                raw = data.numpy().tobytes()
                fh.write(raw)
                digest.update(raw)
        os.replace(tmp, out)
        return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_refit(plan: Plan, plan_file: str | os.PathLike[str]) -> Path:
    """The refit file ``plan`` (read from ``plan_file``) names, checked (module docstring).

    Raises:
        PlanError: the plan names no file, or the file is missing, outside the plan's
            folder, changed since the plan was written, or holds other tensors.
    """
    from safetensors import SafetensorError, safe_open

    r = plan.refit
    if r is None or r.file is None or r.sha256 is None:
        raise PlanError(f"plan '{plan_file}' names no refit file")
    source = Path(plan_file)
    path = inside(source.parent, r.file, source, "refit file", PlanError)
    if not path.is_file():
        raise PlanError(f"plan '{plan_file}' refits {len(r.tensors)} tensor(s) kept in "
                        f"'{path}', which does not exist; copy it with the plan (prune "
                        f"--plan writes both)")
    if _sha256(path) != r.sha256:
        raise PlanError(f"'{path}' is not the refit file plan '{plan_file}' was written with "
                        f"(its sha256 differs); write the plan and its refit file again")
    want = r.shapes()
    try:
        with safe_open(str(path), framework="pt") as f:
            got = {name: (tuple(int(x) for x in f.get_slice(name).get_shape()),
                          f.get_slice(name).get_dtype()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PlanError(f"'{path}' is not a readable safetensors file ({e})") from e
    for name, shape in want.items():
        if name not in got or got[name][0] != shape or got[name][1] not in _FLOAT_DTYPES:
            found = "no such tensor" if name not in got else f"{got[name][1]} {got[name][0]}"
            raise PlanError(f"'{path}' must hold refit tensor '{name}' of shape {shape} "
                            f"(floating point): it has {found}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise PlanError(f"'{path}' holds tensor '{extra[0]}', which plan '{plan_file}' does "
                        f"not refit")
    return path


def read_refit(plan: Plan, plan_file: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The refit values of ``plan``, from its file (checked by `check_refit`)."""
    from safetensors.torch import load_file

    return load_file(str(check_refit(plan, plan_file)), device="cpu")
