"""Greedy continuations of a few prompts, before and after pruning.

Perplexity moves little while a language model's answers already go wrong ("The capital of
France is" stops being followed by " Paris"), so the damage is shown as text too: each prompt
continued greedily (no sampling: the same text on every run) for a fixed number of new
tokens, by the original and by the pruned model, with the model's own tokenizer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..graph.rng import evaluating

DEFAULT_NEW_TOKENS = 16  # tokens each continuation adds


class GenerateError(ValueError):
    """The model cannot continue text (no tokenizer, or no ``generate``), or a prompt gives
    it nothing to continue."""


@dataclass(frozen=True)
class Continuation:
    """One prompt and the greedy continuations of the original and the pruned model."""

    prompt: str
    before: str  # the original's new text (the prompt left out)
    after: str  # the pruned model's
    new_tokens: int  # the most tokens each could add

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_generates(model: nn.Module, tokenizer: Any | None, where: str,
                    prompts: Sequence[str] = ()) -> None:
    """Refuse a model that cannot continue text, or a prompt that gives it no token to start
    from, before any work.

    Raises:
        GenerateError: if ``tokenizer`` is None, ``model`` has no ``generate``, or one of
            ``prompts`` tokenizes to nothing.
    """
    if tokenizer is None:
        raise GenerateError(f"--generate continues prompts with the model's tokenizer, and "
                            f"{where} has none; give a transformers folder with its tokenizer "
                            "files (or a .gguf file)")
    if not callable(getattr(model, "generate", None)):
        raise GenerateError(f"--generate needs a causal language model; {where} is a "
                            f"{type(model).__name__}, which cannot generate text")
    for prompt in prompts:
        _check_prompt(tokenizer, prompt)


def _check_prompt(tokenizer: Any, prompt: str) -> None:
    """Refuse a prompt the tokenizer turns into no token (an empty one, unless the tokenizer
    adds a start token): generation needs at least one token to continue."""
    if not len(tokenizer(prompt)["input_ids"]):
        raise GenerateError(f"the prompt {prompt!r} gives no token with the model's tokenizer, "
                            f"so there is nothing to continue; give some text to continue "
                            f"(say 'The capital of France is')")


def greedy(model: nn.Module, tokenizer: Any, prompt: str,
           new_tokens: int = DEFAULT_NEW_TOKENS) -> str:
    """The greedy continuation of ``prompt`` by ``model`` (the new text only).

    The model's train/eval modes and the caller's random state are left as found.
    """
    check_generates(model, tokenizer, "the model", [prompt])
    param = next(model.parameters(), None)
    enc = tokenizer(prompt, return_tensors="pt")
    if param is not None:
        enc = {k: v.to(param.device) for k, v in enc.items()}
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    with evaluating(model), torch.no_grad():
        out = model.generate(**enc, do_sample=False, num_beams=1,  # type: ignore[operator]
                             max_new_tokens=new_tokens, min_new_tokens=0,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    start = int(enc["input_ids"].shape[-1])
    text: str = tokenizer.decode(out[0, start:], skip_special_tokens=True)
    return text


def continuations(model: nn.Module, reference: nn.Module, tokenizer: Any,
                  prompts: Sequence[str], new_tokens: int = DEFAULT_NEW_TOKENS
                  ) -> list[Continuation]:
    """Each prompt continued greedily by ``reference`` (before) and ``model`` (after).

    Raises:
        GenerateError: if either model cannot generate or there is no tokenizer.
    """
    check_generates(reference, tokenizer, "the original model", prompts)
    check_generates(model, tokenizer, "the pruned model")
    return [Continuation(p, greedy(reference, tokenizer, p, new_tokens),
                         greedy(model, tokenizer, p, new_tokens), new_tokens) for p in prompts]
