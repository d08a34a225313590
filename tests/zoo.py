"""The architecture zoo: one list of models that the engine must trace and prune.

Imported by ``tests/test_zoo.py`` (pass/fail per model) and ``benchmarks/zoo_bench.py``
(timings against Torch-Pruning). Input sizes are the smallest the model allows, so the whole
zoo runs in a few minutes on two CPU cores.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: how to build it, what to feed it and what to leave alone."""

    spec: str  # explorer.load_model spec
    input_shape: tuple[int, ...] | None  # None: the spec's default example input
    ignored: tuple[str, ...]  # classifier / lm_head module names never pruned
    notes: str = ""  # what is special about the model (unsafe groups, pinned parts)
    xfail: str = ""  # non-empty: the model cannot reach the target; the real reason
    data_dims: tuple[int, ...] = ()  # dims of the main output whose size depends on the data
    safe: bool = False  # no group may be left unsafe by the pre-flight

    @property
    def id(self) -> str:
        return self.spec.split("?")[0].rsplit(":", 1)[1]

    def comparable(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``shape`` with the data-dependent dims masked (-1), for before/after checks."""
        return tuple(-1 if d in self.data_dims else n for d, n in enumerate(shape))


_FACTORIES = Path(__file__).resolve().parent / "zoo_factories.py"


def _factory(name: str, ignored: tuple[str, ...], notes: str, data_dims: tuple[int, ...] = (),
             safe: bool = False) -> ZooEntry:
    return ZooEntry(f"{_FACTORIES}:{name}", None, ignored, notes, data_dims=data_dims,
                    safe=safe)


def _native(spec: str, head: str, notes: str) -> ZooEntry:
    """A timm model on its default input (224 px): widths computed from the input
    (``C = x.shape[-1]``, ``C // num_heads``) must be cut jointly; no group left unsafe."""
    return ZooEntry(f"timm:{spec}", None, (head,), notes, safe=True)


def _cnn(name: str, size: int = 64, head: str = "fc", notes: str = "") -> ZooEntry:
    return ZooEntry(f"timm:{name}", (1, 3, size, size), (head,), notes)


def _vit(spec: str, size: int, head: str = "head", notes: str = "", xfail: str = "") -> ZooEntry:
    return ZooEntry(f"timm:{spec}", (1, 3, size, size), (head,), notes, xfail)


ZOO: list[ZooEntry] = [
    # --- CNNs
    _cnn("resnet18"),
    _cnn("resnet50"),
    _cnn("mobilenetv2_100", head="classifier"),
    _cnn("mobilenetv3_small_100", head="classifier", notes="SE blocks, hard-swish, conv_head"),
    _cnn("efficientnet_b0", head="classifier", notes="SE blocks (reduce/expand coupled)"),
    _cnn("regnetx_002", head="head.fc", notes="grouped convs: group axis pruned"),
    _cnn("densenet121", head="classifier", notes="dense concatenation"),
    _cnn("convnext_atto", head="head.fc", notes="LayerNorm2d, layer scale gamma"),
    _cnn("ghostnet_100", head="classifier", notes="ghost modules: cat + slice"),
    _cnn("repvgg_a0", head="head.fc", notes="RepVGG train-time branches"),
    _cnn("inception_v3", size=96, notes="needs >= 75 px"),
    _cnn("dla34", head="fc", notes="1x1-conv classifier, tree aggregation"),
    _cnn("cspdarknet53", head="head.fc", notes="CSP split/cat"),
    _cnn("res2net50_14w_8s", notes="split into 8 scales"),
    _cnn("rexnet_100", head="head.fc", notes="partial residual add on a channel slice"),
    _cnn("hrnet_w18_small", head="classifier", notes="multi-resolution fusion, upsampling"),
    # --- ViTs and hybrids
    _vit("vit_tiny_patch16_224?img_size=64", 64,
         notes="head-dim groups unsafe (hard-coded head_dim); MLP hidden pruned"),
    _vit("vit_small_patch16_224?img_size=64", 64),
    _vit("deit_tiny_patch16_224?img_size=64", 64),
    _vit("vit_small_patch14_dinov2?img_size=56", 56, notes="dinov2-style: layer scale, reg-free"),
    _vit("swin_tiny_patch4_window7_224?img_size=112", 112,
         notes="window partition / relative position bias"),
    ZooEntry("timm:levit_128s", (1, 3, 224, 224), ("head.linear", "head_dist.linear"),
             "attention biases sized by resolution; split([key_dim, key_dim, val_dim]) and "
             "reshape(val_attn_dim) attributes follow the pruning (named by position)",
             safe=True),
    _vit("cait_xxs24_224?img_size=64", 64, notes="talking heads, class attention"),
    ZooEntry("timm:crossvit_tiny_240", (1, 3, 240, 240), ("head.0", "head.1"),
             "two branches, cross attention"),
    _vit("pvt_v2_b0", 64, notes="spatial-reduction attention; reshape(B, C, -1) after the sr "
         "conv ties its output group to the residual width: pruned as a pair (same line)"),
    ZooEntry("timm:efficientformer_l1", (1, 3, 224, 224), ("head", "head_dist"),
             "meta4d/meta3d blocks; attention bias fixed to 7x7 tokens, so native 224 only"),
    _vit("mobilevit_xxs", 64, head="head.fc", notes="unfold/fold of patches"),
    _native("eva02_tiny_patch14_224?num_classes=10", "head",
            "rotary embedding (interleaved rot: see resolve cycle note); reshape(B, N, C) "
            "with C = x.shape[-1] ties the residual to the attention widths: cut jointly. "
            "The MIM config has no head (its output is the residual, which pins the width: "
            "0.677 kept), so num_classes=10 gives it one"),
    _native("xcit_nano_12_p16_224", "head",
            "cross-covariance attention: reshape(..., C // self.num_heads) in the self- and "
            "the class-attention blocks, both tied to the residual: one joint set"),
    _native("coat_lite_tiny", "head",
            "conv relative position encoding splits v by the list attribute channel_splits "
            "(followed); C // num_heads reshape cut jointly with the residual"),
    _native("gcvit_xxtiny", "head.fc", "global query tokens, window attention"),
    _vit("fastvit_t8", 64, head="head.fc", notes="reparam mixers, RepCPE"),
    _vit("edgenext_xx_small", 64, head="head.fc",
         notes="split depthwise transposed attention; XCA's reshape(B, N, C) ties residual "
               "and attention widths, which are pruned together (same failing line)"),
    _vit("maxvit_nano_rw_256?img_size=64", 64, head="head.fc",
         notes="block + grid attention, MBConv"),
    _vit("mixer_s16_224?img_size=64", 64, notes="token-mixing MLP over patches (pinned)"),
    _vit("resmlp_12_224?img_size=64", 64, notes="Affine norm layers"),
    _vit("poolformer_s12", 64, head="head.fc", notes="GroupNorm1, pooling mixer"),
    # --- transformers
    ZooEntry("hf:llama", None, ("lm_head",), "GQA 8/2 heads"),
    ZooEntry("hf:qwen2", None, ("lm_head",), "qkv bias"),
    ZooEntry("hf:mistral", None, ("lm_head",)),
    ZooEntry("hf:gpt2", None, ("lm_head",),
             "Conv1D (transposed linear); c_attn groups unsafe (split(split_size) hard-coded)"),
    ZooEntry("hf:bert", None, (), "encoder; pooler output",
             xfail="AutoModel's outputs are the hidden states, so the hidden size is pinned; "
                   "embeddings, norms and pooler keep ~35% of the parameters"),
    # --- torchvision
    _factory("fasterrcnn_resnet50_fpn", ("roi_heads.box_predictor",),
             "detection: the number of boxes depends on the data, so the pre-flight compares "
             "only data-independent output dims; the RPN head's view(N, -1, 4, H, W) keeps "
             "its anchor group", data_dims=(0,)),
    _factory("shufflenet_v2_x1_0", ("fc",),
             "channel shuffle (view / transpose / view: a permutation of the channels) and "
             "chunk(2), whose halves are tied index by index: every group safe", safe=True),
    # --- demos
    ZooEntry("demo:dino_vit", None, ("head",), "qkv reshape + qkv[0] indexing"),
    ZooEntry("demo:resnet", None, ("fc",)),
    ZooEntry("demo:cnn_concat", None, ("fc",)),
]

__all__ = ["ZOO", "ZooEntry"]


def main_output_shape(out: Any) -> tuple[int, ...]:
    """The shape of a model's main output (tensor, ``ModelOutput`` or tuple)."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
    if isinstance(out, dict) and out:  # detection: boxes first
        return main_output_shape(out.get("boxes", next(iter(out.values()))))
    if isinstance(out, (tuple, list)) and out:
        return main_output_shape(out[0])
    raise TypeError(f"no tensor output in {type(out).__name__}")
