"""Plan fuzzing (issue 13): seeded mutations of real plans for a CNN, a ViT and a Llama.

Every mutated plan is either refused with one `PlanError` line and the model left bit for
bit as it was, or accepted with exactly the result of the unmutated plan (the mutation hit
a field that replay ignores, such as a title). Never a broken or misaligned model. Most
mutations are re-sealed with a fresh checksum, as a user editing a plan on purpose would, so
that the checks behind the checksum are what is tested.
"""
from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from modelstate import ModelState, capture
from torch import nn

from explorer import Plan, Pruner, load_model
from explorer.io.plan import PlanError, checksum

Mutation = Callable[[dict[str, Any], random.Random], str]  # returns a label for failures


@dataclass
class Case:
    pristine: nn.Module
    plan: dict[str, Any]
    result: ModelState  # the unmutated plan's result
    before: ModelState  # the pristine model's state


CASES = {  # spec, pruner options, mutations per case
    "cnn": ("demo:resnet", {}, 120),
    "vit": ("demo:dino_vit_safe", {"heads": "whole"}, 80),
    "llama": ("hf:llama", {"heads": "whole", "iterative_steps": 2, "targets": "all"}, 100),
}


def _case(name: str) -> Case:
    spec, options, _n = CASES[name]
    lm = load_model(spec)
    pristine = copy.deepcopy(lm.model)
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.5, **options)  # type: ignore[arg-type]
    reports = [pruner.step() for _ in range(pruner.steps)]
    plan = Plan.from_pruner(pruner, spec, reports=reports)
    replayed = copy.deepcopy(pristine)
    plan.apply(replayed)
    return Case(pristine, plan.to_dict(), capture(replayed), capture(pristine))


# -- mutations: each edits the plan's JSON data in place ----------------------------------
def _cut(d: dict[str, Any], r: random.Random) -> dict[str, Any]:
    step = r.choice(d["steps"])
    return r.choice(step["tensors"])  # type: ignore[no-any-return]


def shift_one_index(d: dict[str, Any], r: random.Random) -> str:
    cut = _cut(d, r)
    k = r.randrange(len(cut["removed"]))
    cut["removed"][k] += r.choice((-1, 1))
    cut["removed"] = sorted(set(cut["removed"]))
    return f"shift {cut['tensor']}"


def shift_whole_cut(d: dict[str, Any], r: random.Random) -> str:
    cut = _cut(d, r)
    delta = r.choice((-1, 1))
    cut["removed"] = [i + delta for i in cut["removed"]]
    return f"shift all of {cut['tensor']}"


def drop_member_cut(d: dict[str, Any], r: random.Random) -> str:
    step = r.choice(d["steps"])
    gone = step["tensors"].pop(r.randrange(len(step["tensors"])))
    return f"drop {gone['tensor']}"


def drop_one_index(d: dict[str, Any], r: random.Random) -> str:
    cut = _cut(d, r)
    cut["removed"].pop(r.randrange(len(cut["removed"])))
    return f"shorter {cut['tensor']}"


def add_one_index(d: dict[str, Any], r: random.Random) -> str:
    cut = _cut(d, r)
    free = sorted(set(range(cut["size_before"])) - set(cut["removed"]))
    cut["removed"] = sorted(cut["removed"] + [r.choice(free)])
    return f"longer {cut['tensor']}"


def swap_names(d: dict[str, Any], r: random.Random) -> str:
    step = r.choice(d["steps"])
    a, b = r.sample(step["tensors"], 2)
    a["tensor"], b["tensor"] = b["tensor"], a["tensor"]
    return f"swap {a['tensor']} {b['tensor']}"


def change_dim_or_size(d: dict[str, Any], r: random.Random) -> str:
    cut = _cut(d, r)
    key = r.choice(("dim", "size_before"))
    cut[key] = r.choice((cut[key] + 1, cut[key] - 1, 0, -1, 10**17, True, "1", None, 1.5))
    return f"{key} of {cut['tensor']}"


def bad_removed(d: dict[str, Any], r: random.Random) -> str:
    cut = _cut(d, r)
    cut["removed"] = r.choice(([], [-1], [10**6], list(range(cut["size_before"])), "0,1",
                               [0, 0], list(reversed(cut["removed"])), [[0]], None))
    return f"removed of {cut['tensor']}"


def rename_tensor(d: dict[str, Any], r: random.Random) -> str:
    cut = _cut(d, r)
    cut["tensor"] = r.choice((cut["tensor"] + "_", "", "weight", cut["tensor"].replace(
        "weight", "bias"), "__class__", 7))
    return "rename tensor"


def _attribute(d: dict[str, Any], r: random.Random) -> tuple[dict[str, Any], str, str] | None:
    pairs = [(s["attributes"], m, a) for s in d["steps"] for m in s["attributes"]
             for a in s["attributes"][m]]
    return r.choice(pairs) if pairs else None


def change_attribute_value(d: dict[str, Any], r: random.Random) -> str:
    found = _attribute(d, r)
    if found is None:
        return "no attribute"
    attrs, module, attr = found
    old, new = attrs[module][attr]
    value = r.choice((0, -1, "x", True, None, 1.5, [new], 10**17,
                      new + 1 if isinstance(new, int) else [*new[:-1], new[-1] + 1]))
    attrs[module][attr] = r.choice(([old, value], [value, new]))
    return f"value {module}.{attr}"


def drop_attribute(d: dict[str, Any], r: random.Random) -> str:
    found = _attribute(d, r)
    if found is None:
        return "no attribute"
    attrs, module, attr = found
    del attrs[module][attr]
    return f"drop {module}.{attr}"


def inject_attribute(d: dict[str, Any], r: random.Random) -> str:
    step = r.choice(d["steps"])
    module = r.choice([""] + list(step["attributes"]) + [c["tensor"].rpartition(".")[0]
                                                         for c in step["tensors"]])
    attr, pair = r.choice((("_modules", [{}, {}]), ("training", [False, "banana"]),
                           ("head_dim", [8, 0]), ("variance_epsilon", [1e-6, "x"]),
                           ("num_batches_tracked", [0, 1]), ("forward", [None, 1]),
                           ("in_features", [16, 8]), ("num_heads", [8, 4]),
                           ("fused_attn", [False, True]), ("hidden_size", [64, 32])))
    step["attributes"].setdefault(module, {})[attr] = pair
    return f"inject {module}.{attr}"


def edit_steps(d: dict[str, Any], r: random.Random) -> str:
    how = r.choice(("swap", "dup", "drop_all", "empty", "not_list"))
    if how == "swap" and len(d["steps"]) > 1:
        d["steps"].reverse()
    elif how == "dup":
        d["steps"].append(copy.deepcopy(r.choice(d["steps"])))
    elif how == "drop_all":
        for s in d["steps"]:
            s["tensors"] = []
    elif how == "empty":
        d["steps"][0] = {}
    else:
        d["steps"] = {"0": d["steps"][0]}
    return f"steps {how}"


def edit_top(d: dict[str, Any], r: random.Random) -> str:
    key = r.choice(("schema", "model", "input_shapes", "fingerprint", "steps", "extra"))
    value = r.choice((None, True, 2, "1", [], {}, [[1, 3, 8, 8]], "timm:resnet18", 1))
    if key == "extra":
        d["unknown_field"] = value
    elif r.random() < 0.3:
        del d[key]
    else:
        d[key] = value
    return f"top {key}"


def edit_fingerprint(d: dict[str, Any], r: random.Random) -> str:
    entry = r.choice(d["fingerprint"]["tensors"])
    entry[1] = [s + 1 for s in entry[1]] if entry[1] else [1]
    if r.random() < 0.5:  # a careful forger re-hashes it too
        d["fingerprint"]["sha256"] = _hash_fingerprint(d["fingerprint"]["tensors"])
    return f"fingerprint {entry[0]}"


def edit_ignored_fields(d: dict[str, Any], r: random.Random) -> str:
    step = r.choice(d["steps"])
    step[r.choice(("title", "group", "head_mode"))] = r.choice((None, "x", [1, 2]))
    if r.random() < 0.5:
        d["model"] = "demo:something_else"
    return "ignored fields"


def _hash_fingerprint(entries: list[Any]) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()


MUTATIONS: tuple[Mutation, ...] = (
    shift_one_index, shift_whole_cut, drop_member_cut, drop_one_index, add_one_index,
    swap_names, change_dim_or_size, bad_removed, rename_tensor, change_attribute_value,
    drop_attribute, inject_attribute, edit_steps, edit_top, edit_fingerprint,
    edit_ignored_fields,
)


def _ids(model: nn.Module) -> dict[str, int]:
    return {n: id(t) for n, t in [*model.named_parameters(remove_duplicate=False),
                                  *model.named_buffers(remove_duplicate=False)]}


def _same_result(expected: ModelState, model: nn.Module) -> None:
    got = capture(model, clone=False)
    assert got.tensors.keys() == expected.tensors.keys()
    for k, t in expected.tensors.items():
        assert got.tensors[k].shape == t.shape and got.tensors[k].dtype == t.dtype, k
        assert t.device.type == "meta" or torch.equal(got.tensors[k], t), k
    assert got.training == expected.training
    assert got.attributes == expected.attributes
    assert got.config == expected.config


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Hundreds of tiny tensor ops: thread start-up would cost more than the ops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mutate(mutation: Any, data: dict[str, Any], r: random.Random) -> str:
    """Apply ``mutation``; one that cannot apply to what an earlier mutation left (steps no
    longer a list) is skipped and named so."""
    try:
        return str(mutation(data, r))
    except (KeyError, TypeError, IndexError, AttributeError):
        return f"{mutation.__name__} (skipped: the plan is already broken there)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_mutated_plans_are_refused_or_harmless(name: str, one_thread: None) -> None:
    case = _case(name)
    rng = random.Random(f"issue-13-{name}")
    outcomes = {"refused": 0, "accepted": 0}
    for i in range(CASES[name][2]):
        data = json.loads(json.dumps(case.plan))  # a deep copy, faster
        labels = [_mutate(rng.choice(MUTATIONS), data, rng)
                  for _ in range(1 + (rng.random() < 0.2))]
        if rng.random() < 0.9 and isinstance(data, dict):
            data["sha256"] = checksum(data)
        model = copy.deepcopy(case.pristine)
        ids = _ids(model)
        where = f"{name} mutation {i} ({', '.join(labels)})"
        try:
            Plan.loads(json.dumps(data)).apply(model)
        except PlanError as e:
            text = str(e)
            assert "\n" not in text and "tensor(" not in text and len(text) < 600, where
            _same_result(case.before, model)  # bit for bit, and the very same tensors:
            assert _ids(model) == ids, where
            outcomes["refused"] += 1
            continue
        _same_result(case.result, model)
        outcomes["accepted"] += 1
    assert outcomes["refused"] > outcomes["accepted"] > 0, outcomes
