"""Command line: ``python -m explorer trace|prune ...`` (also ``pruning-explorer``)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .api import trace
from .pruner import HEAD_MODES, Pruner
from .specs import LoadedModel, SpecError, load_model, parse_input_shape
from .tracer import TraceError


class CliError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="timm:NAME, hf:FAMILY, demo:NAME or file.py:fn")
    p.add_argument("--device", default="cpu", choices=["cpu", "meta"])
    p.add_argument("--input-shape", default=None, help="e.g. 1,3,224,224 or 1,16 for LMs")
    p.add_argument("--weights", default=None, help="local state dict (.safetensors or .pt)")
    p.add_argument("--ignore", action="append", default=[], help="module to leave unpruned")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pruning-explorer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trace", help="trace a model and list its coupling groups")
    _add_model_args(t)
    p = sub.add_parser("prune", help="prune a model and report what changed")
    _add_model_args(p)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--importance", default="magnitude")
    p.add_argument("--heads", default="dims", choices=HEAD_MODES)
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--global", dest="global_pruning", action="store_true")
    p.add_argument("--out", default=None, help="save the pruned module (torch.save, a pickle)")
    p.add_argument("--plan", default=None, help="write the step reports as JSON")
    return parser


def _load(args: argparse.Namespace) -> LoadedModel:
    shape = parse_input_shape(args.input_shape) if args.input_shape else None
    return load_model(args.model, device=args.device, input_shape=shape, weights=args.weights)


def _ignored(lm: LoadedModel, extra: list[str]) -> list[str]:
    return list(extra)


def cmd_trace(args: argparse.Namespace) -> dict[str, Any]:
    lm = _load(args)
    start = time.perf_counter()
    mg = trace(lm.model, lm.example_inputs, ignored=_ignored(lm, args.ignore))
    out = mg.to_dict()
    out["seconds"] = round(time.perf_counter() - start, 4)
    out["model"] = args.model
    out["device"] = args.device
    if not args.json:
        lines = [f"{args.model}: {mg.num_ops} ops, {len(mg.groups())} groups "
                 f"({out['num_prunable']} prunable) in {out['seconds']:.2f}s"]
        for g in mg.groups():
            state = "prunable" if g.prunable else f"fixed: {g.reason}"
            lines.append(f"  [{g.id}] {g.title} ({len(g.members)} members) - {state}")
        out["_text"] = "\n".join(lines)
    return out


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    lm = _load(args)
    pruner = Pruner(lm.model, lm.example_inputs, importance=args.importance, ratio=args.ratio,
                    iterative_steps=args.steps, global_pruning=args.global_pruning,
                    heads=args.heads, round_to=args.round_to,
                    ignored=_ignored(lm, args.ignore))
    groups_total = sum(g.prunable for g in pruner.groups)
    reports = [pruner.step() for _ in range(pruner.steps)]
    first, last = reports[0], reports[-1]
    pruned_groups = {c.group for c in first.changes if c.removed}
    out: dict[str, Any] = {
        "model": args.model,
        "params_before": first.params_before, "params_after": last.params_after,
        "macs_before": first.macs_before, "macs_after": last.macs_after,
        "groups_total": groups_total, "groups_pruned": len(pruned_groups),
        "forward_ok": all(r.forward_ok for r in reports),
        "output_shape_ok": all(r.output_shape_ok for r in reports),
        "unsafe": [{"group": u.group, "module": u.module, "location": u.location,
                    "error": u.error} for r in reports for u in r.unsafe],
        "steps": [r.to_dict() for r in reports],
    }
    if args.plan:
        with open(args.plan, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    if args.out:
        torch.save(lm.model, args.out)
    if not args.json:
        out["_text"] = (f"{args.model}: params {out['params_before']:,} -> "
                        f"{out['params_after']:,}, MACs {out['macs_before']:,} -> "
                        f"{out['macs_after']:,}; {out['groups_pruned']}/{groups_total} groups "
                        f"pruned; forward {'ok' if out['forward_ok'] else 'FAILED'}; "
                        f"{len(out['unsafe'])} unsafe group(s) skipped")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"trace": cmd_trace, "prune": cmd_prune}
    try:
        out = handlers[args.command](args)
    except (SpecError, TraceError, CliError, ValueError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    text = out.pop("_text", None)
    if args.json or text is None:
        print(json.dumps(out, default=str))
    else:
        print(text)
    return 0
