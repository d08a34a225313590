"""Dump coupling results (groups, members, axes, heads, atoms) to compare two versions.

Usage::

    python benchmarks/coupling_dump.py dump OUT.json [--all] [--channels]
    python benchmarks/coupling_dump.py compare OLD.json NEW.json

Run ``dump`` with the old code (e.g. ``PYTHONPATH=<old checkout>``) and the new one, then
``compare``: every group (axes, members, head structure, reasons, explanations), the
conflicts, unknown ops, and a hash of every member's atom matrix and of the families must
be identical. ``--all`` takes the whole zoo (tests/zoo.py), otherwise a set of about 20
models that covers CNNs, grouped convs, concatenation, ViTs, rotary, GQA and the
transformers built-ins. ``--channels`` resolves channel by channel (``Coupling(...,
intervals=False)``), the reference the interval resolution must match.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SUBSET = ("resnet18", "mobilenetv3_small_100", "efficientnet_b0", "regnetx_002",
          "densenet121", "convnext_atto", "ghostnet_100", "vit_tiny_patch16_224",
          "swin_tiny_patch4_window7_224", "eva02_tiny_patch14_224", "mixer_s16_224",
          "llama", "qwen2", "mistral", "gpt2", "bert", "dino_vit", "resnet", "cnn_concat")
EXTRA = (("hf:gemma", None, ()), ("hf:phi3", None, ()), ("demo:llama", None, ()),
         ("demo:mlp", None, ()))


def _hash(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()
                          + str(a.shape).encode()).hexdigest()[:16]


def dump_one(spec: str, shape: tuple[int, ...] | None, ignored: tuple[str, ...],
             channels: bool = False) -> dict[str, Any]:
    import explorer
    from explorer.io.specs import load_model

    lm = load_model(spec, input_shape=shape)
    t0 = time.perf_counter()
    mg = explorer.trace(lm.model, lm.example_inputs, ignored=list(ignored))
    if channels:
        from explorer.coupling.analyze import Coupling
        mg.coupling = Coupling(mg.graph, ignored, intervals=False)
    seconds = time.perf_counter() - t0
    c = mg.coupling
    return {
        "spec": spec,
        "seconds": round(seconds, 3),  # not compared
        "groups": [dataclasses.asdict(g) for g in mg.groups()],
        "conflicts": list(c.conflicts),
        "unknown_ops": {k: list(v) for k, v in sorted(c.unknown_ops.items())},
        "num_classes": int(c.res.num_classes),
        "atoms": [[m.param, m.dim, _hash(a)] for m, a in c.member_atoms()],
        "family_of": _hash(c.family_of),
        "family_atoms": [_hash(a) for a in c.family_atoms],
    }


def _models(everything: bool) -> list[tuple[str, tuple[int, ...] | None, tuple[str, ...]]]:
    from zoo import ZOO

    chosen = [e for e in ZOO if everything or e.id.split("?")[0] in SUBSET]
    return [(e.spec, e.input_shape, e.ignored) for e in chosen] + list(EXTRA)


def _unrooted(value: Any) -> str:
    """JSON of ``value`` with checkout paths (``/any/where/explorer/...``,
    ``/any/where/tests/zoo_factories.py``) made relative."""
    return re.sub(r'/[^"\s:]*?/(explorer|tests)/', r"\1/", json.dumps(value))


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Differences, one line each (empty: identical)."""
    old = {json.loads(_unrooted(k)): v for k, v in old.items()}
    new = {json.loads(_unrooted(k)): v for k, v in new.items()}
    out = []
    for spec in old:
        if spec not in new:
            out.append(f"{spec}: missing in the new dump")
            continue
        a, b = old[spec], new[spec]
        for key in a:
            if key != "seconds" and _unrooted(a[key]) != _unrooted(b.get(key)):
                out.append(f"{spec}: {key} differs")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out")
    d.add_argument("--all", action="store_true")
    d.add_argument("--channels", action="store_true",
                   help="resolve channel by channel (the reference)")
    c = sub.add_parser("compare")
    c.add_argument("old")
    c.add_argument("new")
    args = parser.parse_args()
    if args.cmd == "dump":
        import explorer
        print(f"explorer from {explorer.__file__}", file=sys.stderr)
        result = {}
        for spec, shape, ignored in _models(args.all):
            result[spec] = dump_one(spec, shape, ignored, args.channels)
            print(f"{spec}: {len(result[spec]['groups'])} groups, "
                  f"{result[spec]['seconds']:.2f} s", file=sys.stderr)
        Path(args.out).write_text(json.dumps(result, indent=0, default=str))
        return
    diffs = compare(json.loads(Path(args.old).read_text()),
                    json.loads(Path(args.new).read_text()))
    old = json.loads(Path(args.old).read_text())
    print("\n".join(diffs) if diffs else f"identical: {len(old)} models")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
