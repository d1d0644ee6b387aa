"""Batched teacher-forced scoring for evaluation: answer NLLs, with the gates read at the edited token.

It uses the shared prompt encoding of ``grun_fast.data`` so a model is scored on exactly the tokens it was
trained on. Rows are padded on the right, so the edit position of each row is ``prompt_len - 1``; they are
sorted by length before batching, so a batch wastes little on padding; results come back in input order.
(Greedy generation lives in ``generation``.)
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from grun_fast.answer_head import head_nll, logits_nll, supports_answer_head
from grun_fast.architectures import locate
from grun_fast.data.encoding import IGNORE_INDEX, encode_rows, pad_examples, pad_token_id_of
from grun_fast.errors import GRUNError
from grun_fast.patching import adapter_modules, adapter_names, edit_at

GateModules = Mapping[str, Mapping[int, torch.nn.Module]]


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def gate_modules(model: torch.nn.Module, names: str | Sequence[str] | None = None
                 ) -> dict[str, dict[int, torch.nn.Module]]:
    """``{adapter name: {layer: module}}`` for the adapters whose gates are reported (None: all that are on)."""
    if names is None:
        names = adapter_names(model, enabled_only=True)
    elif isinstance(names, str):
        names = [names]
    return {name: dict(adapter_modules(model, name)) for name in names}


def edit_at_positions(model: torch.nn.Module, positions: torch.Tensor):
    """Edit exactly at ``positions`` during this forward (nothing to do for a model without adapters)."""
    if not adapter_names(model, enabled_only=True):
        return contextlib.nullcontext()
    return edit_at(model, positions=positions)


def batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise GRUNError(f"batch_size must be >= 1, got {batch_size}")
    return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def read_gates(modules: GateModules, positions: torch.Tensor) -> dict[str, dict[int, np.ndarray]]:
    """The gate of each module at the edited token of each row of the latest forward.

    ``last_prompt``/``mask`` adapters record one gate per edited row ([B]); ``all`` adapters one per token
    ([B, T]), read here at ``positions``.
    """
    batch = positions.shape[0]
    out: dict[str, dict[int, np.ndarray]] = {}
    for name, layers in modules.items():
        out[name] = {}
        for layer, module in layers.items():
            gate = getattr(module, "last_gate", None)
            if gate is None:
                raise RuntimeError(f"adapter {name!r} layer {layer}: no gate recorded by the last forward")
            gate = gate.detach().float()
            if gate.dim() == 2 and gate.shape[0] == batch:
                gate = gate[torch.arange(batch, device=gate.device), positions.to(gate.device)]
            elif gate.numel() != batch:
                raise RuntimeError(f"adapter {name!r} layer {layer}: expected one gate per row at the edited "
                                   f"token, got shape {tuple(gate.shape)} for {batch} rows")
            out[name][layer] = gate.reshape(batch).cpu().numpy()
    return out


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (most Hugging Face causal LMs do)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def answer_nll(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *,
               answer_key: str = "answer", question_key: str = "question", template: str = "auto",
               batch_size: int = 16, max_length: int = 512, gates: GateModules | None = None,
               desc: str | None = None, encoding: str = "grun") -> tuple[np.ndarray, dict[str, dict[int, np.ndarray]]]:
    """Mean token NLL of ``row[answer_key]`` given the prompt of ``row[question_key]``, per row.

    The answer is scored with its EOS, as it is trained. Returns ``(nll [N], gates)`` with
    ``gates[adapter][layer]`` the gate at the edited token of every row ([N]); the gate depends only on the
    prompt (causal attention), so it is the same for every answer scored after the same question.
    """
    gates = gates or {}
    examples = encode_rows(tokenizer, rows, template, max_length, answer_key, question_key, encoding=encoding)
    pad_id = pad_token_id_of(tokenizer)
    device = model_device(model)
    n = len(examples)
    nll = np.full(n, np.nan)
    gate_out = {name: {layer: np.full(n, np.nan) for layer in layers} for name, layers in gates.items()}
    # The backbone, then the LM head only where an answer token is predicted (``answer_head``); other
    # models go through their own forward, keeping logits from the earliest edited token on.
    backbone = locate(model)[0] if supports_answer_head(model) else None
    trims_logits = keeps_logits(model)
    order = sorted(range(n), key=lambda i: -len(examples[i]["input_ids"]))
    for idx in tqdm(batches(order, batch_size), desc=desc, disable=desc is None, leave=False):
        batch = pad_examples([examples[i] for i in idx], pad_id, "right")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        target = F.pad(batch["labels"].to(device)[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts t+1
        with edit_at_positions(model, batch["edit_pos"].to(device)):
            if backbone is not None:
                hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                sums = head_nll(model, hidden, target)
            else:
                keep = {"logits_to_keep": ids.shape[1] - int(batch["edit_pos"].min())} if trims_logits else {}
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **keep).logits
                sums = logits_nll(logits, target)
        counts = (target != IGNORE_INDEX).sum(-1).clamp_min(1)
        nll[idx] = (sums.double() / counts).cpu().numpy()
        for name, layers in read_gates(gates, batch["edit_pos"]).items():
            for layer, values in layers.items():
                gate_out[name][layer][idx] = values
    return nll, gate_out
