"""Score a GRUN-patched model with an evaluator that does not know GRUN (open-unlearning, your own loop).

Such evaluators run one teacher-forced forward of prompt+answer, ``model(input_ids, attention_mask,
labels)``, and read the logits at the answer tokens. A ``last_prompt`` adapter edits the token just before
the answer, and a plain forward cannot tell where that is: it treats the whole input as the prompt and edits
its LAST token, after the answer, so the answer is scored as if the adapter were not there. The wrapper
below learns each row's prompt end from the labels (or from explicit prompt lengths) and runs the forward
inside ``grun_fast.edit_at``, so the evaluator sees the adapter's real scores.

    scorer = EditAtPromptEnd(model)                 # patched model; attribute access goes through
    out = scorer(input_ids=ids, attention_mask=mask, labels=labels)     # logits with the edit at each
                                                                        # row's last prompt token
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grun_fast.data.encoding import IGNORE_INDEX
from grun_fast.errors import GRUNError
from grun_fast.evaluation.scoring import edit_at_positions


def prompt_end_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Column of each row's last prompt token: the column just before its first labelled token.

    ``labels`` [B, T] are aligned with ``input_ids`` (Hugging Face style: -100 on the prompt and padding, the
    answer tokens elsewhere; the model shifts them). Left or right padding both work. A row without any
    labelled token is all prompt: its last real token (per ``attention_mask``) is returned, as a plain
    forward would edit. A row labelled from its first real token has no prompt to edit: GRUNError.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise GRUNError(f"labels must be an integer tensor [batch, seq_len], got {shape}")
    batch, width = labels.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, width):
        raise GRUNError(f"attention_mask has shape {tuple(attention_mask.shape)} but labels {(batch, width)}")
    steps = torch.arange(width, device=labels.device)
    labelled = labels != IGNORE_INDEX
    has_answer = labelled.any(-1)
    first = torch.where(labelled, steps, width).min(-1).values
    if attention_mask is None:
        real = torch.ones_like(labelled)
    else:
        real = attention_mask.to(labels.device) != 0
    last_real = (real.long() * steps).argmax(-1)
    ends = torch.where(has_answer, first - 1, last_real)
    ok = (ends >= 0) & real.gather(1, ends.clamp_min(0)[:, None]).squeeze(1)
    if not bool(ok.all()):
        row = int((~ok).nonzero()[0])
        raise GRUNError(f"row {row} is labelled from its first real token (column {int(first[row])}): there is "
                        "no prompt token before the answer to edit; pass prompt_lengths explicitly")
    return ends


def positions_from_prompt_lengths(prompt_lengths: Any, batch: int, width: int,
                                  attention_mask: torch.Tensor | None = None,
                                  device: torch.device | None = None) -> torch.Tensor:
    """Column of each row's last prompt token from its prompt length in real tokens (left padding counted
    from ``attention_mask``: the row's first real column + length - 1)."""
    lengths = torch.as_tensor(prompt_lengths, device=device)
    if lengths.dim() == 0:
        lengths = lengths.expand(batch)
    if lengths.shape != (batch,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise GRUNError(f"prompt_lengths must be {batch} integers (one per row), got {prompt_lengths!r:.80}")
    if bool((lengths < 1).any()):
        raise GRUNError(f"prompt_lengths must be >= 1 (a prompt has at least one token), got {lengths.tolist()}")
    start = torch.zeros(batch, dtype=torch.long, device=lengths.device)
    if attention_mask is not None:
        start = (attention_mask.to(lengths.device) != 0).long().argmax(-1)
    ends = start + lengths.long() - 1
    if bool((ends >= width).any()):
        raise GRUNError(f"prompt_lengths {lengths.tolist()} reach past the {width}-token input")
    return ends


class EditAtPromptEnd(nn.Module):
    """A patched model whose teacher-forced forwards edit each row's last prompt token.

    forward(input_ids, attention_mask, labels, ...) finds the prompt ends from ``labels`` (-100 before the
    first answer token) or, overriding them, from ``prompt_lengths=`` (per call, or given here as the
    default), and runs the wrapped model under ``grun_fast.edit_at``; everything else (``generate``,
    ``config``, ``device``, ``generation_config``...) is the wrapped model's, so Hugging Face-style evaluators
    accept it. A forward with neither labels nor prompt lengths, or one that continues a KV cache, runs
    plainly (the whole input is the prompt, as in generation). A model without enabled adapters runs plainly.
    """

    def __init__(self, model: nn.Module, prompt_lengths: Any = None):
        super().__init__()
        self.wrapped_model = model
        self.prompt_lengths = prompt_lengths

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)        # parameters, buffers, submodules (wrapped_model)
        except AttributeError:
            wrapped = self.__dict__.get("_modules", {}).get("wrapped_model")
            if wrapped is None:
                raise
            return getattr(wrapped, name)

    def edit_positions(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None, prompt_lengths: Any = None,
                       inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | None:
        """The columns this wrapper would edit for these inputs (None: a plain forward)."""
        lengths = prompt_lengths if prompt_lengths is not None else self.prompt_lengths
        ref = input_ids if input_ids is not None else inputs_embeds
        if lengths is not None:
            if ref is None:
                raise GRUNError("prompt_lengths given but neither input_ids nor inputs_embeds")
            return positions_from_prompt_lengths(lengths, ref.shape[0], ref.shape[1], attention_mask, ref.device)
        if labels is not None:
            if ref is not None and tuple(labels.shape) != tuple(ref.shape[:2]):
                raise GRUNError(f"labels have shape {tuple(labels.shape)} but the input {tuple(ref.shape[:2])}")
            return prompt_end_positions(labels, attention_mask)
        return None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, prompt_lengths: Any = None, **kwargs: Any) -> Any:
        model = self.wrapped_model
        call = dict(kwargs, input_ids=input_ids, attention_mask=attention_mask)
        if labels is not None:
            call["labels"] = labels
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None and getattr(cache, "get_seq_length", lambda: 0)() > 0:
            return model(**call)
        positions = self.edit_positions(input_ids, attention_mask, labels, prompt_lengths,
                                        kwargs.get("inputs_embeds"))
        if positions is None:
            return model(**call)
        with edit_at_positions(model, positions):
            return model(**call)
