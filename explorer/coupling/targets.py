"""Targets: what kind of channels a group holds, so a user can say what may be cut.

A group is classified from its coupling alone, never from module names: a group that
residual adds sum across blocks is the residual stream (`Group.residual`, see
`coupling.residual`), a group with head structure is attention heads (`Group.heads`), a
group of hidden units read and written only by linear layers is an MLP's, and everything
else (convolution channels, say) is plain channels.

On a language model (token ids index an embedding table: decoder LLMs, text encoders) the
default leaves the residual stream alone: cutting the hidden size changes the embeddings,
every norm and every projection at once, and is what turns a pruned LLM's output to garbage.
Other models (vision transformers, CNNs) keep every target, as they always did: the hidden
width of a ViT is commonly pruned, and DINO's joint head/width cuts depend on it.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..graph.ir import Graph, ValueKind, value_refs
from ..graph.ops import SAME_VALUES_OPS, TOKEN_EMBEDDING_OPS
from .groups import Group
from .vocab import AxisRole, Target

TARGET_NAMES = tuple(t.value for t in Target)  # for argparse help and multiselects
# what each target holds, in the words the command line and the app both show
TARGET_WORDS = ("mlp (feed-forward hidden units), heads (attention), residual (the hidden "
                "size: embeddings, norms, every projection), channels (convolutions, other "
                "layers)")
ALL = "all"


def target_of(group: Group) -> Target:
    """The kind of channels ``group`` holds (see the module docstring)."""
    if group.residual:
        return Target.RESIDUAL
    if group.heads is not None:
        return Target.HEADS
    ranks = [m.rank for m in group.members if not m.buffer]
    linear = all(r <= 2 for r in ranks) and sum(r == 2 for r in ranks) >= 2
    if linear and any(a.role is AxisRole.CHANNELS for a in group.axes):
        return Target.MLP
    return Target.CHANNELS


def is_transformer(groups: Sequence[Group]) -> bool:
    """Whether the model has attention heads (then ``heads="keep"`` leaves its residual
    stream alone too: every attention projection reads and writes it)."""
    return any(g.heads is not None for g in groups)


def reads_tokens(graph: Graph) -> bool:
    """Whether the model is a language model: an embedding table is indexed by a model
    input (token ids), as given or reshaped / copied on the way (`SAME_VALUES_OPS`)."""
    for node in graph.ops:
        if node.op.overloadpacket in TOKEN_EMBEDDING_OPS:
            refs = value_refs(node.args[1:2])
            if any(_from_input(graph, r.vid) for r in refs):
                return True
    return False


def _from_input(graph: Graph, vid: int) -> bool:
    """Whether value ``vid`` holds a model input's values (through same-values ops)."""
    seen: set[int] = set()
    while vid not in seen:
        seen.add(vid)
        value = graph.values[vid]
        if value.kind is ValueKind.INPUT:
            return True
        if value.producer is None:
            return False
        producer = graph.ops[value.producer]
        if producer.op.overloadpacket not in SAME_VALUES_OPS:
            return False
        source = value_refs(producer.args[:1])
        if not source:
            return False
        vid = source[0].vid
    return False


def default_targets(graph: Graph) -> frozenset[Target]:
    """Every target but the residual stream on a language model (`reads_tokens`); every
    target otherwise."""
    if reads_tokens(graph):
        return frozenset(Target) - {Target.RESIDUAL}
    return frozenset(Target)


def parse_targets(names: str | Iterable[str | Target]) -> frozenset[Target]:
    """``"mlp,heads"``, ``["mlp", "heads"]`` or ``"all"`` as a set of targets.

    Raises:
        ValueError: an unknown or empty choice, naming the valid ones.
    """
    items = names.split(",") if isinstance(names, str) else list(names)
    words = [str(n).strip().lower() for n in items if str(n).strip()]
    if not words:
        raise ValueError(f"targets: name at least one of {', '.join(TARGET_NAMES)} (or "
                         f"'{ALL}')")
    if ALL in words:
        return frozenset(Target)
    unknown = [w for w in words if w not in TARGET_NAMES]
    if unknown:
        raise ValueError(f"unknown target '{unknown[0]}'; choose from "
                         f"{', '.join(TARGET_NAMES)}, comma-separated, or '{ALL}'")
    return frozenset(Target(w) for w in words)


def target_list(targets: Iterable[Target]) -> list[str]:
    """The targets' names in the vocabulary's order (for JSON, settings and messages)."""
    chosen = set(targets)
    return [t.value for t in Target if t in chosen]
