"""Command line: ``python -m explorer trace|prune|replay|export|evaluate|graph|learn ...``.

Also installed as the ``pruning-explorer`` console script.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from ..api import trace
from ..coupling.heads import AttentionInfo, attention_modules, head_changes
from ..coupling.targets import TARGET_WORDS, parse_targets, target_of
from ..graph.metrics import count_params
from ..graph.tracer import TraceError
from ..io import defaults
from ..io.data import BUILTIN_TEXT, TEXT_SUFFIXES, DataOptions, check_apart, load_data, read_texts
from ..io.export import (
    DEFAULT_FORMATS,
    ExportResult,
    check_out_dir,
    export,
    parse_formats,
    snapshot,
)
from ..io.large import LargeRefit, refit_to_file
from ..io.paths import check_out_apart
from ..io.plan import Plan, Refit
from ..io.quiet import quiet_transformers
from ..io.refit import read_refit, refit_file
from ..io.specs import (
    LoadedModel,
    SpecError,
    check_checkpoint_files,
    checkpoint_folder,
    load_model,
    load_offloaded,
    parse_input_shape,
    spec_paths,
)
from ..prune.calibration import Calibration, load_calibration
from ..prune.importance import Criterion
from ..prune.offloaded import rebased_heads
from ..prune.preflight import forward_check
from ..prune.pruner import HEAD_MODES, Pruner, StepReport
from ..prune.records import said_once
from ..prune.sequential import (
    SEQUENTIAL_CRITERIA,
    SequentialError,
    sequential_criterion,
)
from ..prune.settings import ALLOCATIONS, COMPENSATION_WORDS, COMPENSATIONS, HEAD_MODE_WORDS
from ..prune.statement import Statement, statement
from ..quality.evaluate import Quality, evaluate, scored_tokens
from ..quality.generate import DEFAULT_NEW_TOKENS, Continuation, check_generates, continuations
from ..quality.original import Original
from ..quality.task import Task
from ..render.dot import view_to_dot
from ..render.view import build_view
from .allocator import return_freed_memory


class CliError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


# seconds building or tracing a model may take without --timeout: minutes for a large local
# checkpoint on CPU; a factory that never returns ends here instead of hanging
DEFAULT_TIMEOUT = 300.0


def _add_model_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required,
                   help="timm:NAME, timm:FOLDER, hf:FAMILY, hf:FOLDER, demo:NAME or file.py:fn")
    p.add_argument("--device", default="cpu", choices=["cpu", "meta"])
    p.add_argument("--input-shape", default=None, help="e.g. 1,3,224,224 or 1,16 for LMs")
    p.add_argument("--weights", default=None, help="local state dict (.safetensors or .pt)")
    p.add_argument("--ignore", action="append", default=[], help="module to leave unpruned")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--timeout", type=_count_float, default=None, metavar="SECONDS",
                   help=f"give up building and tracing the model after this many seconds "
                        f"(default {DEFAULT_TIMEOUT:g}; 0: no limit)")


def _number(kind: type[int] | type[float], lowest: float, strict: bool, what: str
            ) -> Callable[[str], Any]:
    """An argparse type: ``kind`` above (``strict``) or at least ``lowest``, finite."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > lowest if strict else value >= lowest) or \
                value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, 0, True, "a positive integer")
_count = _number(int, 0, False, "an integer >= 0")
_count_float = _number(float, 0.0, False, "a number of seconds >= 0")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_MAX_MEMORY = 2**50  # 1 PiB: more than any one machine holds


def _memory_size(text: str) -> int:
    """``--max-memory``: a size such as ``8GB``, ``512MiB`` or ``300KB``, in bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.I)
    size = 0.0
    if match:
        size = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    if not 0 < size <= _MAX_MEMORY:
        raise argparse.ArgumentTypeError(f"must be a size like 8GB, 512MiB or 300KB, above 0 "
                                          f"and at most 1 PiB, got {text!r}")
    return int(size)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text!r}")
    return value


def _targets(text: str) -> str:
    try:
        parse_targets(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratio", type=_ratio, default=0.5)
    p.add_argument("--importance", default=None,
                   help="how channels are scored (default: activation on a language model "
                        "with a tokenizer, reading --calibration or built-in text; magnitude "
                        "otherwise)")
    p.add_argument("--heads", default=None, choices=HEAD_MODES,
                   help=f"{HEAD_MODE_WORDS} (default: keep for a language model with real "
                        f"weights unless --targets names heads or residual, else dims)")
    p.add_argument("--targets", default=None, type=_targets, metavar="LIST",
                   help=f"what may be cut, comma-separated: {TARGET_WORDS} "
                        f"(or all). Default: all but residual on language models (token ids "
                        f"into an embedding: the hidden size, embeddings and norms stay), all "
                        f"otherwise")
    p.add_argument("--round-to", type=_positive_int, default=1)
    p.add_argument("--steps", type=_positive_int, default=1)
    p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                   help="how widths are shared out across layers: uniform (the same fraction "
                        "of every layer: the export is a from_pretrained folder), global "
                        "(channels ranked across layers by scores normalised per layer), "
                        "measured (each layer cut alone at a few depths on --calibration data; "
                        "the same parameter count as uniform with the least measured change; "
                        "about 3 forwards of 8 samples per layer more). Widths that differ "
                        "export as safetensors + plan")
    p.add_argument("--global", dest="allocation", action="store_const", const="global",
                   help="the same as --allocation global")
    p.add_argument("--target-params", type=float, default=None,
                   help="prune until params <= this fraction of the original (overrides ratio)")
    p.add_argument("--target-macs", type=float, default=None,
                   help="prune until MACs <= this fraction of the original (overrides ratio)")
    p.add_argument("--calibration", default=None,
                   help="data for data-aware criteria: .txt (one sample a line) or .jsonl "
                        "('text' field) tokenized with the model's tokenizer, an image folder, "
                        "or a tensor file (.pt, weights_only)")
    p.add_argument("--eval", dest="eval_data", default=None,
                   help="held-out data (same forms, never the calibration samples): measure "
                        "quality before and after (perplexity, cosine, KL, top-1)")
    _add_data_args(p, "samples of each data file")
    p.add_argument("--max-memory", type=_memory_size, default=None, metavar="SIZE",
                   help="with --device meta and hf:FOLDER: compute a data-aware criterion "
                        "one decoder layer at a time from the folder's weights, holding at "
                        "most SIZE (e.g. 8GB) in CPU memory; the rest is offloaded to disk")
    p.add_argument("--offload-folder", default=None,
                   help="where --max-memory offloads weights and keeps activations "
                        "(default: a temporary folder, removed afterwards)")
    _add_generate_args(p)
    p.add_argument("--compensate", default="none", choices=COMPENSATIONS,
                   help=f"{COMPENSATION_WORDS}; without --calibration a causal language model "
                        f"reads built-in prose, others random inputs: check quality with --eval")


def _add_data_args(p: argparse.ArgumentParser, samples: str) -> None:
    """How much data a command reads and how it batches it (`io.data.DataOptions`, whose
    defaults these are); ``samples`` says which samples ``--num-samples`` counts."""
    p.add_argument("--num-samples", type=int, default=DataOptions.num_samples,
                   help=f"use the first N {samples} (default: all)")
    p.add_argument("--seq-len", type=int, default=DataOptions.seq_len,
                   help="tokens per text sample at most")
    p.add_argument("--batch-size", type=int, default=DataOptions.batch_size,
                   help="samples per forward")


def _data_options(args: argparse.Namespace) -> DataOptions:
    return DataOptions(args.num_samples, args.seq_len, args.batch_size)


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generate", action="append", default=[], metavar="PROMPT",
                   help="continue PROMPT greedily with the original and the pruned model "
                        "(repeatable; needs a tokenizer): the text shows the damage")
    p.add_argument("--max-new-tokens", type=_positive_int, default=DEFAULT_NEW_TOKENS,
                   help="tokens each --generate continuation adds")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one ``error:`` line (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pruning-explorer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trace", help="trace a model and list its coupling groups")
    _add_model_args(t)
    t.add_argument("--no-preflight", action="store_true",
                   help="skip the pre-flight of each group at ratio 0.5 (alone and jointly)")
    p = sub.add_parser("prune", help="prune a model and report what changed")
    _add_model_args(p)
    _add_prune_args(p)
    p.add_argument("--out", default=None, help="save the pruned module (torch.save, a pickle)")
    p.add_argument("--plan", default=None, help="write the pruning plan (JSON) to this file")
    p.add_argument("--force", action="store_true", help="overwrite existing --out/--plan files")
    r = sub.add_parser("replay", help="apply a saved plan to a fresh model and export it")
    _add_model_args(r, model_required=False)
    r.add_argument("--checkpoint", default=None,
                   help="transformers folder (config + safetensors shards) to prune shard by "
                        "shard, without loading the model (instead of --model)")
    r.add_argument("--plan", required=True, help="plan JSON written by prune --plan")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--formats", default="pt,safetensors",
                   help="comma-separated: pt, safetensors, hf, report")
    r.add_argument("--force", action="store_true",
                   help="replace a non-empty --out folder (with --checkpoint: write into it)")
    e = sub.add_parser("export", help="prune a model and export it")
    _add_model_args(e)
    _add_prune_args(e)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help="comma-separated: pt (a pickle), safetensors (+ plan.json), hf, report")
    e.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    ev = sub.add_parser("evaluate", help="measure a pruned model against the original on "
                                         "held-out data, one batch at a time")
    ev.add_argument("--model", required=True, help="the pruned model: hf:FOLDER (an export "
                                                    "with --formats hf, or replay --checkpoint)")
    ev.add_argument("--reference", required=True, help="the original model: hf:FOLDER")
    ev.add_argument("--eval", dest="eval_data", default=None,
                    help="held-out data: .txt (one sample a line), .jsonl, an image folder or "
                         "a tensor file")
    _add_data_args(ev, "held-out samples")
    _add_generate_args(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--debug", action="store_true", help="show full tracebacks")
    ev.add_argument("--timeout", type=_count_float, default=None, metavar="SECONDS",
                    help=f"give up loading the models after this many seconds (default "
                         f"{DEFAULT_TIMEOUT:g}; 0: no limit)")
    gv = sub.add_parser("graph", help="print the graph view model (nodes and edges)")
    _add_model_args(gv)
    gv.add_argument("--depth", type=_count, default=2, help="modules above this depth open")
    gv.add_argument("--group", type=int, default=None, help="id of the group to select")
    gv.add_argument("--no-fold", action="store_true", help="do not fold repeated blocks")
    lr = sub.add_parser("learn", help="train digits models and compare pruning criteria")
    lr.add_argument("--models", default="cnn,vit", help="comma-separated: cnn, vit, vit-dino")
    lr.add_argument("--finetune-epochs", type=_count, default=2)
    lr.add_argument("--cache-dir", default=None, help="default: ~/.cache/pruning-explorer")
    lr.add_argument("--no-cache", action="store_true", help="recompute, write nothing")
    lr.add_argument("--json", action="store_true", help="print one JSON object")
    lr.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def _load(args: argparse.Namespace) -> LoadedModel:
    calibration, held = getattr(args, "calibration", None), getattr(args, "eval_data", None)
    if calibration and held:
        check_apart(calibration, held)  # before the (slow) model load
    shape = parse_input_shape(args.input_shape) if args.input_shape else None
    with _deadline(args.timeout, "building the model"):
        return load_model(args.model, device=args.device, input_shape=shape,
                          weights=args.weights)


@contextmanager
def _deadline(given: float | None, what: str) -> Iterator[None]:
    """Raise `CliError` when the body runs longer than ``given`` seconds (None:
    `DEFAULT_TIMEOUT`; 0: no limit). Main thread only (SIGALRM); a long C call ends first.

    An alarm already set (a caller's own deadline, pytest-timeout's) keeps its time: when it
    comes first its handler runs, and it is set again for the time it has left after.
    """
    seconds = DEFAULT_TIMEOUT if given is None else given
    if not seconds or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "SIGALRM"):
        yield
        return
    which = " (the default)" if given is None else ""
    outer, interval = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    pending = [outer]  # the outer alarm's delay, until it has run

    def expire(signum: int, frame: Any) -> None:
        left = seconds - (time.monotonic() - start)
        if pending[0] and left > 0:  # the outer alarm, due first: its handler, then ours
            pending[0] = 0.0
            signal.setitimer(signal.ITIMER_REAL, left)
            if callable(previous):
                previous(signum, frame)
            return
        raise CliError(f"{what} took longer than --timeout {seconds:g} s{which}: a factory "
                       f"that never returns? If it is only slow, raise it (--timeout "
                       f"{max(4 * seconds, 600):g}, or 0 for no limit)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer) if outer else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending[0]:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3),
                             interval)


def _sources(args: argparse.Namespace) -> list[str]:
    """Every local path the command reads: the model spec's files, weights, plan, data,
    checkpoint. What it writes must keep clear of them (`_check_writes`)."""
    model = getattr(args, "model", None)
    found = [str(p) for p in spec_paths(model)] if model else []
    for key in ("weights", "calibration", "eval_data", "checkpoint"):
        value = getattr(args, key, None)
        if value:
            found.append(value)
    if args.command == "replay":
        found.append(args.plan)
    return found


def _check_writes(args: argparse.Namespace, *flags: str) -> None:
    """Refuse before any work when a written path (``--out``, ``--plan``, ``--offload-folder``)
    is a source, lies inside a source folder or holds a source."""
    sources = _sources(args)
    for flag in flags:
        path = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
        if path:
            check_out_apart(path, sources, CliError, flag)


def _check_new_file(path: str, force: bool) -> None:
    target = Path(path)
    if target.is_dir():
        raise CliError(f"'{path}' is a folder; give a file name")
    if target.exists() and not force:
        raise CliError(f"'{path}' exists; choose another name or pass --force to overwrite it")


def _save_new(path: str, force: bool, write: Callable[[str], None]) -> None:
    """Write a file through a temporary file beside it; refuse to overwrite unless ``force``."""
    target = Path(path)
    _check_new_file(path, force)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                   dir=target.parent if str(target.parent) else ".")
    except OSError as e:
        raise CliError(f"cannot write '{path}': {e.strerror or e}") from e
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except (OSError, RuntimeError) as e:
        raise CliError(f"cannot write '{path}': {getattr(e, 'strerror', None) or e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cmd_trace(args: argparse.Namespace) -> dict[str, Any]:
    lm = _load(args)
    start = time.perf_counter()
    with _deadline(args.timeout, "tracing the model"):
        mg = trace(lm.model, lm.example_inputs, ignored=list(args.ignore))
    out = mg.to_dict()
    out["seconds"] = round(time.perf_counter() - start, 4)
    verdicts = {} if args.no_preflight else _verdicts(lm, mg, list(args.ignore))
    out["preflight"] = {str(k): v for k, v in verdicts.items()}
    out["model"] = args.model
    out["device"] = args.device
    out["notes"] = list(lm.notes)
    if not args.json:
        lines = [f"{args.model}: {mg.num_ops} ops, {len(mg.groups())} groups "
                 f"({out['num_prunable']} prunable) in {out['seconds']:.2f}s"]
        for g in mg.groups():
            state = "prunable" if g.prunable else f"fixed: {g.reason}"
            if g.id in verdicts:
                state += f"; pre-flight at 0.5: {verdicts[g.id]}"
            lines.append(f"  [{g.id}] {g.title} ({target_of(g)}, {len(g.members)} members) - "
                         f"{state}")
        lines += [f"  note: {n}" for n in lm.notes]
        out["_text"] = "\n".join(lines)
    return out


def _verdicts(lm: LoadedModel, mg: Any, ignored: list[str]) -> dict[int, str]:
    """Group id -> pre-flight verdict at ratio 0.5 (head dims), alone and jointly."""
    from ..render.proposal_view import verdict_labels
    pruner = Pruner(lm.model, lm.example_inputs, ignored=ignored, importance="random"
                    if any(p.device.type == "meta" for p in lm.model.parameters())
                    else "magnitude")
    pending = pruner.pending()
    labels = verdict_labels(pruner.verdicts(pending), {p.key: p.group.title for p in pending})
    ids = {g.key: g.id for g in mg.groups()}
    return {ids[k]: v for k, v in labels.items() if k in ids}


@dataclass
class _Pruned:
    pruner: Pruner
    reports: list[StepReport]
    summary: dict[str, Any]  # the ``prune --json`` object
    attention: tuple[list[AttentionInfo], list[AttentionInfo]]  # before, after
    quality: Quality | None  # on the --eval data; None without it
    said: Statement  # what each target would lose, stated before cutting
    original: torch.nn.Module | None  # the model before pruning, when measured or reported
    generations: list[Continuation]  # --generate prompts continued before and after
    refit: Refit | None = None  # the large-model path's refit file, for the plan


def _data(args: argparse.Namespace, lm: LoadedModel) -> tuple[Calibration | None,
                                                                Calibration | None]:
    """Calibration and held-out data from ``--calibration`` / ``--eval`` (checked apart in
    `_load`)."""
    opts = _data_options(args)
    if (args.eval_data or args.generate) and args.device == "meta":
        raise CliError(f"{'--eval' if args.eval_data else '--generate'} measures quality, "
                       f"which needs weights; use --device cpu")
    apart = read_texts(args.eval_data) if args.calibration == BUILTIN_TEXT and args.eval_data \
        and Path(args.eval_data).suffix in TEXT_SUFFIXES else []
    calib = load_data(args.calibration, lm, opts, apart_from=apart) if args.calibration \
        else None
    held = load_data(args.eval_data, lm, opts) if args.eval_data else None
    if held is not None:
        _check_scorable(held, lm.task, args.eval_data)
    return calib, held


def _check_scorable(held: Calibration, task: Task, path: str) -> None:
    """Refuse held-out text too short for a causal LM's perplexity, before any work (its
    quality would silently fall back to the output cosine)."""
    if task is Task.CAUSAL_LM and scored_tokens(held) == 0:
        raise CliError(f"--eval {path!r}: no sample is two tokens or more, so perplexity has "
                       f"no next token to score; give held-out text of a sentence or more a "
                       f"line")


def _checkpoint_folder(args: argparse.Namespace, lm: LoadedModel) -> Path:
    """The weights folder behind a meta ``hf:FOLDER`` model, for ``--max-memory``."""
    if args.device != "meta":
        raise CliError("--max-memory scores a model that does not fit in memory from its "
                       "checkpoint; use it with --device meta (without it, the model is "
                       "loaded whole)")
    folder = checkpoint_folder(args.model)
    if folder is None:
        raise CliError(f"--max-memory needs an hf:FOLDER model with safetensors weights; "
                       f"'{args.model}' is not one")
    if args.importance not in SEQUENTIAL_CRITERIA:
        raise CliError(f"--max-memory: importance '{args.importance}' has no layer-by-layer "
                       f"form; use one of {', '.join(SEQUENTIAL_CRITERIA)}")
    if args.steps != 1:
        raise CliError("--max-memory scores the original weights once: use --steps 1")
    if args.compensate == "bias":
        raise CliError("--max-memory refits layer by layer with --compensate lstsq (bias "
                       "compensation is its strongest ridge); use lstsq or none")
    if args.compensate == "lstsq" and not args.plan:
        raise CliError("--max-memory with --compensate lstsq writes the refit weights beside "
                       "the plan; give --plan FILE (then replay --checkpoint)")
    return folder


@dataclass
class _Large:
    """The large-model path's checkpoint, placed by accelerate within ``--max-memory``."""

    model: torch.nn.Module  # the unpruned checkpoint (weights offloaded)
    data: Calibration
    work: Path  # --offload-folder or a temporary folder
    scores: Criterion  # --importance, computed one decoder layer at a time


@contextmanager
def _offloaded(args: argparse.Namespace, lm: LoadedModel,
               calib: Calibration | None) -> Iterator[_Large]:
    """``--importance`` computed from the checkpoint one decoder layer at a time, within
    ``--max-memory`` (`explorer.prune.sequential`); the placed checkpoint stays for the
    refit of ``--compensate lstsq`` until the body ends."""
    folder = _checkpoint_folder(args, lm)
    data = load_calibration(calib, lm.example_inputs)
    with contextlib.ExitStack() as stack:
        work = Path(args.offload_folder) if args.offload_folder else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="pe-offload-")))
        check_checkpoint_files(folder)  # a truncated shard: named, not deep in the loader
        try:
            with quiet_transformers():
                off = load_offloaded(folder, max_memory={"cpu": args.max_memory},
                                     offload_folder=work / "weights")
        except SequentialError as e:
            raise CliError(f"--max-memory: {e}") from e
        except (ValueError, OSError, RuntimeError) as e:
            raise CliError(f"--max-memory: cannot place '{folder}' ({e})") from e
        theirs = {n for n, _ in off.model.named_parameters()}
        ours = {n for n, _ in lm.model.named_parameters()}
        if theirs != ours:
            missing = sorted(ours - theirs)[:3]
            raise CliError(f"--max-memory: the checkpoint's architecture names other weights "
                           f"than the model spec's (e.g. {missing}); give the spec the "
                           f"checkpoint's task (hf:FOLDER?task=...)")
        try:
            scores = sequential_criterion(off.model, data, args.importance,
                                          activations_folder=work / "activations")
        except (SequentialError, RuntimeError) as e:
            raise CliError(f"--max-memory: {' '.join(str(e).split())[:300]}") from e
        yield _Large(off.model, data, work, scores)


def _large_refit(args: argparse.Namespace, big: _Large, pruner: Pruner) -> LargeRefit:
    """``--compensate lstsq`` on the large-model path: the refit file beside ``--plan``."""
    if not pruner.applied:
        return LargeRefit(None)
    try:
        return refit_to_file(big.model, pruner.model, pruner.applied[0], big.data,
                             refit_file(args.plan), big.work / "refit")
    except (SequentialError, RuntimeError) as e:
        raise CliError(f"--max-memory --compensate lstsq: "
                       f"{' '.join(str(e).split())[:300]}") from e


def _check_rebase(pruner: Pruner) -> None:
    """Refuse a cut the in-memory path would re-base heads for (the large-model path
    does not), before anything is cut."""
    removal, _changes, _skipped = pruner.propose()
    modules = rebased_heads(pruner.model, pruner.coupling, removal)
    if modules:
        raise CliError(f"--max-memory --compensate lstsq: this head-dim cut re-bases the heads "
                       f"of {modules[0]} in memory, which the layer-by-layer refit does not; "
                       f"use --heads whole, query or keep, or prune in memory")


def _prune(args: argparse.Namespace, lm: LoadedModel, report: bool = False) -> _Pruned:
    """Run the pruner's steps (and measure quality on ``--eval`` data); keep the original
    for that and for a ``report``."""
    chosen = defaults.choose(lm, args.importance, args.calibration, args.num_samples,
                             weights=args.device != "meta" or bool(args.max_memory),
                             heads=args.heads, targets=args.targets)
    args.importance, args.calibration, args.heads = (chosen.importance, chosen.calibration,
                                                     chosen.heads)
    calib, held = _data(args, lm)
    if args.generate:
        check_generates(lm.model, lm.tokenizer, args.model, args.generate)
    keep = Original(lm.model) if held is not None or report or args.generate else None
    with contextlib.ExitStack() as stack:
        big = stack.enter_context(_offloaded(args, lm, calib)) if args.max_memory else None
        with _deadline(args.timeout, "tracing the model"):
            pruner = Pruner(lm.model, lm.example_inputs, importance=args.importance,
                            ratio=args.ratio, iterative_steps=args.steps,
                            allocation=args.allocation, heads=args.heads,
                            round_to=args.round_to, ignored=list(args.ignore),
                            target_params=args.target_params, target_macs=args.target_macs,
                            calibration=calib,
                            compensate=None if args.compensate == "none" or big is not None
                            else args.compensate,
                            scores=None if big is None else big.scores, targets=args.targets)
        said = statement(pruner)  # what each target will lose, before anything is cut
        heads_before = attention_modules(lm.model, pruner.coupling)
        groups_total = sum(g.prunable for g in pruner.groups)
        refit = big is not None and args.compensate == "lstsq"
        if refit:
            _check_rebase(pruner)
        reports = [pruner.step() for _ in range(pruner.steps)]
        large = _large_refit(args, big, pruner) if big is not None and refit else None
    if large is not None:
        reports[-1].notes = said_once([*reports[-1].notes, *large.notes])
    first, last = reports[0], reports[-1]
    pruned_groups = {c.group for c in first.changes if c.removed}
    heads_after = attention_modules(lm.model, pruner.coupling)
    out: dict[str, Any] = {
        "model": args.model,
        "params_before": first.params_before, "params_after": last.params_after,
        "macs_before": first.macs_before, "macs_after": last.macs_after,
        "groups_total": groups_total, "groups_pruned": len(pruned_groups),
        "forward_ok": all(r.forward_ok for r in reports),
        "output_shape_ok": all(r.output_shape_ok for r in reports),
        "unsafe": [{"group": u.group, "module": u.module, "location": u.location,
                    "error": u.error, "advice": u.advice} for r in reports for u in r.unsafe],
        "steps": [r.to_dict() for r in reports],
        "notes": said_once([*([chosen.note] if chosen.note else []), *lm.notes,
                            *(n for r in reports for n in r.notes)]),
        "attention": [c.to_dict() for c in head_changes(heads_before, heads_after)],
        "targets": said.to_dict(),
    }
    out["notes"] += _unmet(args, out, pruner.max_ratio)
    original = keep.get() if keep is not None else None
    quality = (evaluate(lm.model, original, held, task=lm.task)
               if held is not None and original is not None else None)
    out["quality"] = quality.to_dict() if quality is not None else None
    texts = (continuations(lm.model, original, lm.tokenizer, args.generate,
                           args.max_new_tokens) if args.generate and original is not None
             else [])
    out["generations"] = [c.to_dict() for c in texts]
    return _Pruned(pruner, reports, out, (heads_before, heads_after), quality, said, original,
                   texts, None if large is None else large.refit)


def _unmet(args: argparse.Namespace, out: dict[str, Any], max_ratio: float) -> list[str]:
    """A note for each of ``--target-params`` / ``--target-macs`` the cut did not reach (the
    search stops at the deepest ratio allowed; the rest of the model is not cut)."""
    notes = []
    for flag, want, what in (("--target-params", args.target_params, "params"),
                             ("--target-macs", args.target_macs, "macs")):
        before, after = out[f"{what}_before"], out[f"{what}_after"]
        if want is not None and before and after is not None and after > want * before:
            notes.append(f"{flag} {want:g} not met: {after / before:.1%} of the "
                         f"{'parameters' if what == 'params' else 'MACs'} kept at the deepest "
                         f"cut allowed (ratio {max_ratio:g} of every axis cut); the rest is in "
                         f"what is not cut (targets: {', '.join(out['targets']['targets'])}; "
                         f"--targets residual adds the hidden size and embeddings)")
    return notes


def _plan(pruner: Pruner, lm: LoadedModel, reports: list[StepReport]) -> Plan:
    return Plan.from_pruner(pruner, lm.spec, reports=reports)


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    _check_writes(args, "--plan", "--out", "--offload-folder")
    for path in (args.plan, args.out):  # refuse before any work
        if path:
            _check_new_file(path, args.force)
    if args.plan and args.max_memory and args.compensate == "lstsq":
        _check_new_file(str(refit_file(args.plan)), args.force)
    lm = _load(args)
    run = _prune(args, lm)
    out, groups_total = run.summary, run.summary["groups_total"]
    if args.plan:
        plan = _plan(run.pruner, lm, run.reports)
        if run.refit is not None:
            plan.refit = run.refit
            out["refit"] = {"file": str(refit_file(args.plan)),
                            "tensors": len(run.refit.tensors),
                            "created": len(run.refit.created)}
        _save_new(args.plan, args.force, plan.save)
        out["plan"] = args.plan
        if run.refit is None and args.compensate not in (None, "none") and \
                (plan.refit is None or plan.refit.file is None):
            out["notes"].append(
                f"--compensate {args.compensate} changed weights that {args.plan} does not "
                f"hold (a plan records the cut): replaying it gives the plain cut; keep the "
                f"refit model with --out, or export --formats safetensors,hf, or make the "
                f"plan with --device meta --max-memory SIZE (its refit file goes beside it)")
    if args.out:
        _save_new(args.out, args.force, lambda tmp: torch.save(lm.model, tmp))
    if not args.json:
        out["_text"] = (run.said.text() + "\n" +
                        f"{args.model}: params {out['params_before']:,} -> "
                        f"{out['params_after']:,}, MACs {out['macs_before']:,} -> "
                        f"{out['macs_after']:,}; {out['groups_pruned']}/{groups_total} groups "
                        f"pruned; forward {'ok' if out['forward_ok'] else 'FAILED'}; "
                        f"{len(out['unsafe'])} unsafe group(s) skipped")
        out["_text"] += "".join(f"\n  {line}"
                                for line in _cut_lines(run.reports, run.attention))
        for u in out["unsafe"]:
            out["_text"] += f"\n  unsafe group {u['group']}: {u['module']} {u['location']}: " \
                            f"{u['error']}" + (f"; {u['advice']}" if u["advice"] else "")
        if out["quality"] is not None:
            out["_text"] += "\n  " + _quality_line(out["quality"])
        out["_text"] += _generation_lines(run.generations)
        for note in out["notes"]:
            out["_text"] += f"\n  note: {note}"
    return out


def _cut_lines(reports: list[StepReport],
               attention: tuple[list[AttentionInfo], list[AttentionInfo]] = ([], [])
               ) -> list[str]:
    """What each step cut, one line per layer (``where``), in order, in the words a person
    uses for the axis (``key/value groups`` under GQA, ``dims per head``); a one-step cut of
    an attention module also says its query and key/value heads before and after, as its
    config will."""
    many = len(reports) > 1
    before = {a.module: a for a in attention[0]}
    after = {a.module: a for a in attention[1]}
    lines = []
    for r in reports:
        for c in r.changes:
            if not c.removed:
                continue
            was, now = before.get(c.where), after.get(c.where)
            gqa = was is not None and was.kv_heads is not None and was.kv_heads < was.num_heads
            line = (("" if not many else f"step {r.step}: ") +
                    f"cut {c.where or c.title}: {c.axis.words(c.width_before, gqa)} "
                    f"{c.width_before} -> {c.width_after}")
            if not many and was is not None and now is not None:
                line += _head_counts(was, now)
            lines.append(line)
    return lines


def _head_counts(was: AttentionInfo, now: AttentionInfo) -> str:
    """`` (query heads 8 -> 4, key/value heads 2 -> 1)``: the counts that changed."""
    parts = [f"{name} {a} -> {b}" for name, a, b in
             (("query heads", was.num_heads, now.num_heads),
              ("key/value heads", was.kv_heads, now.kv_heads)) if a != b and a and b]
    return f" ({', '.join(parts)})" if parts else ""


def _quality_line(q: dict[str, Any]) -> str:
    """``quality (cosine) on 20 held-out samples: 1.0000 -> 0.9123``."""
    return (f"quality ({q['metric']}) on {q['samples']} held-out samples: {q['before']:.4f} -> "
            f"{q['after']:.4f}")


def _generation_lines(texts: Sequence[Continuation]) -> str:
    """Each prompt and its two greedy continuations, one per line."""
    return "".join(f"\n  {c.prompt!r}\n    before: {c.before!r}\n    after:  {c.after!r}"
                   for c in texts)


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if not args.eval_data and not args.generate:
        raise CliError("evaluate needs --eval FILE (held-out data) or --generate PROMPT")
    with _deadline(args.timeout, "loading the models"):
        pruned = load_model(args.model)
        if args.generate:
            check_generates(pruned.model, pruned.tokenizer, args.model, args.generate)
        reference = load_model(args.reference)
    if pruned.task is not reference.task:
        raise CliError(f"{args.model} is a {pruned.task.value} model and {args.reference} a "
                       f"{reference.task.value} model; compare a pruned model with its original")
    opts = _data_options(args)
    held = load_data(args.eval_data, reference, opts) if args.eval_data else None
    if held is not None:
        _check_scorable(held, reference.task, args.eval_data)
    quality = evaluate(pruned.model, reference.model, held, task=reference.task) \
        if held is not None else None
    texts = continuations(pruned.model, reference.model, pruned.tokenizer, args.generate,
                          args.max_new_tokens) if args.generate else []
    out: dict[str, Any] = {
        "model": args.model, "reference": args.reference,
        "params": count_params(pruned.model), "params_reference": count_params(reference.model),
        "quality": quality.to_dict() if quality is not None else None,
        "generations": [c.to_dict() for c in texts]}
    out["_text"] = (f"{args.model} against {args.reference}: params "
                    f"{out['params_reference']:,} -> {out['params']:,}"
                    + ("" if quality is None else "\n  " + _quality_line(out["quality"]))
                    + _generation_lines(texts))
    return out


def _check_cpu(args: argparse.Namespace) -> None:
    if args.device == "meta":
        raise CliError(f"{args.command} writes weights, which a meta-device model has none "
                       f"of; use --device cpu (make plans on meta with prune --plan)")


def _export_summary(res: ExportResult) -> dict[str, Any]:
    return {"out": res.directory, "files": res.files, "messages": res.messages,
            "config": None if res.config is None else
            {"changed": res.config.changed, "ok": res.config.ok, "reason": res.config.reason}}


def _forward_ok(lm: LoadedModel) -> bool:
    return forward_check(lm.model, lm.example_inputs, None).ok


def cmd_replay(args: argparse.Namespace) -> dict[str, Any]:
    _check_writes(args, "--out")
    if args.checkpoint:
        from ..io.stream import replay_command
        return replay_command(args.checkpoint, args.plan, args.out, args.force)
    if not args.model:
        raise CliError("replay needs --model SPEC, or --checkpoint DIR for a transformers "
                       "checkpoint folder")
    _check_cpu(args)
    formats = parse_formats(args.formats)
    check_out_dir(Path(args.out), args.force)
    plan = Plan.load(args.plan)
    lm = _load(args)
    original = snapshot(lm.model) if "report" in formats else None
    before = count_params(lm.model)
    values = read_refit(plan, args.plan) if plan.refit is not None and plan.refit.file \
        else None
    replay = plan.apply(lm.model, example_inputs=lm.example_inputs, refit=values)
    res = export(lm.model, args.out, formats, plan=plan, original=original,
                 example_inputs=lm.example_inputs, tokenizer=lm.tokenizer, force=args.force,
                 sentence=lm.sentence, sources=_sources(args))
    if plan.refit is not None and values is None:
        res.messages.append(f"the plan records {len(plan.refit.tensors)} refit tensor(s) whose "
                            f"values were saved with the model it was made on, not beside the "
                            f"plan: this replay has the plain cut (added biases zero); load "
                            f"that export with explorer.load_pruned")
    out = {"model": args.model, "plan": args.plan, "steps": len(plan.steps),
           "tensors_changed": len(replay.shapes), "params_before": before,
           "params_after": count_params(lm.model),
           "forward_ok": _forward_ok(lm), **_export_summary(res)}
    out["_text"] = (f"{args.model}: replayed {len(plan.steps)} step(s) of {args.plan}, "
                    f"params {before:,} -> {out['params_after']:,}; wrote "
                    f"{', '.join(res.files) or 'nothing'} to {args.out}"
                    + "".join(f"\n  note: {m}" for m in res.messages))
    return out


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    _check_writes(args, "--out", "--offload-folder")
    _check_cpu(args)
    formats = parse_formats(args.formats)
    check_out_dir(Path(args.out), args.force)
    lm = _load(args)
    run = _prune(args, lm, report="report" in formats)
    out = run.summary
    res = export(lm.model, args.out, formats, plan=_plan(run.pruner, lm, run.reports),
                 original=run.original, example_inputs=lm.example_inputs,
                 attention=run.attention, quality=run.quality, tokenizer=lm.tokenizer,
                 generations=run.generations,
                 force=args.force, sentence=lm.sentence, sources=_sources(args))
    out.update(_export_summary(res))
    out.pop("steps")
    # the run's notes the export's messages already say (its hf fall-back carries the
    # step's config note) are not said again
    out["notes"] = [n for n in said_once([*res.messages, *out["notes"]])
                    if n not in res.messages]
    out["_text"] = (run.said.text() + "\n" + f"{args.model}: params {out['params_before']:,} -> "
                    f"{out['params_after']:,}; wrote {', '.join(res.files) or 'nothing'} to "
                    f"{args.out}"
                    + "".join(f"\n  {line}" for line in _cut_lines(run.reports, run.attention))
                    + "".join(f"\n  note: {m}" for m in res.messages)
                    + ("" if out["quality"] is None else "\n  " + _quality_line(out["quality"]))
                    + _generation_lines(run.generations)
                    + "".join(f"\n  note: {n}" for n in out["notes"]))
    return out


def cmd_learn(args: argparse.Namespace) -> dict[str, Any]:
    from ..teach import learn  # imports scikit-learn: only for this command

    settings = learn.LearnSettings(models=tuple(args.models.split(",")),
                                   finetune_epochs=args.finetune_epochs)
    result = learn.run(settings, directory=args.cache_dir, use_cache=not args.no_cache)
    return {**result.to_dict(), "_text": learn.summary_text(result)}


def cmd_graph(args: argparse.Namespace) -> dict[str, Any]:
    lm = _load(args)
    with _deadline(args.timeout, "tracing the model"):
        mg = trace(lm.model, lm.example_inputs, ignored=list(args.ignore))
    view = build_view(mg, depth=args.depth, group=args.group, fold=not args.no_fold).visible()
    out: dict[str, Any] = dict(view.to_dict())
    if not args.json:
        out["_text"] = view_to_dot(view)
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return_freed_memory()  # the peak follows what is held (see explorer.app.allocator)
    handlers = {"trace": cmd_trace, "prune": cmd_prune, "replay": cmd_replay,
                "export": cmd_export, "evaluate": cmd_evaluate, "learn": cmd_learn,
                "graph": cmd_graph}
    try:
        out = handlers[args.command](args)
    except (SpecError, TraceError, CliError, ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug, not a user error: still one line
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (a bug; rerun with "
              f"--debug and report the traceback)", file=sys.stderr)
        return 1
    text = out.pop("_text", None)
    try:
        print(json.dumps(out, default=str) if args.json or text is None else text)
        sys.stdout.flush()
    except BrokenPipeError:  # piped into `head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep interpreter exit quiet
    return 0
