"""Batched model work for evaluation: teacher-forced answer NLLs (with the gates read at the edited token)
and greedy generation.

Both use the shared prompt encoding of ``grun_fast.data`` so a model is scored on exactly the tokens it was
trained on. Scoring pads on the right, so the edit position of each row is ``prompt_len - 1``; generation
pads on the left and lets ``last_prompt`` adapters edit the last prompt token during prefill. Rows are
sorted by length before batching, so a batch wastes little on padding; results come back in input order.
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

from grun_fast.data.encoding import encode_example, pad_examples, pad_token_id_of
from grun_fast.data.prompts import prompt_ids
from grun_fast.patching import adapter_modules, adapter_names, edit_at

GateModules = Mapping[str, Mapping[int, torch.nn.Module]]


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def gate_modules(model: torch.nn.Module, names: str | Sequence[str] | None = None
                 ) -> dict[str, dict[int, torch.nn.Module]]:
    """``{adapter name: {layer: module}}`` for the adapters whose gates are reported (None: all of them)."""
    if names is None:
        names = adapter_names(model)
    elif isinstance(names, str):
        names = [names]
    return {name: dict(adapter_modules(model, name)) for name in names}


def edit_at_positions(model: torch.nn.Module, positions: torch.Tensor):
    """Edit exactly at ``positions`` during this forward (nothing to do for a model without adapters)."""
    if not adapter_names(model):
        return contextlib.nullcontext()
    return edit_at(model, positions=positions)


def batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (most Hugging Face causal LMs do)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def answer_nll(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *,
               answer_key: str = "answer", question_key: str = "question", template: str = "plain",
               batch_size: int = 16, max_length: int = 512, gates: GateModules | None = None,
               desc: str | None = None) -> tuple[np.ndarray, dict[str, dict[int, np.ndarray]]]:
    """Mean token NLL of ``row[answer_key]`` given the prompt of ``row[question_key]``, per row.

    The answer is scored with its EOS, as it is trained. Returns ``(nll [N], gates)`` with
    ``gates[adapter][layer]`` the gate at the edited token of every row ([N]); the gate depends only on the
    prompt (causal attention), so it is the same for every answer scored after the same question.
    """
    gates = gates or {}
    examples = [encode_example(tokenizer, r, template, max_length, answer_key, question_key) for r in rows]
    pad_id = pad_token_id_of(tokenizer)
    device = model_device(model)
    n = len(examples)
    nll = np.full(n, np.nan)
    gate_out = {name: {layer: np.full(n, np.nan) for layer in layers} for name, layers in gates.items()}
    order = sorted(range(n), key=lambda i: -len(examples[i]["input_ids"]))
    for idx in tqdm(batches(order, batch_size), desc=desc, disable=desc is None, leave=False):
        batch = pad_examples([examples[i] for i in idx], pad_id, "right")
        ids = batch["input_ids"].to(device)
        # Logits are needed from the earliest last-prompt token on: the prompt positions before it skip the
        # LM head (a large share of a small model's work, and of the logits' memory for a large vocabulary).
        keep = {"logits_to_keep": ids.shape[1] - int(batch["edit_pos"].min())} if _keeps_logits(model) else {}
        with edit_at_positions(model, batch["edit_pos"].to(device)):
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                           use_cache=False, **keep).logits
        offset = ids.shape[1] - logits.shape[1]  # logits[:, j] belongs to position offset + j
        labels = batch["labels"].to(device)[:, 1:]  # labels[:, p] is the token predicted at position p
        rows_i, cols = (labels != -100).nonzero(as_tuple=True)
        # Only the answer positions are lifted to fp32: the full [B, T, V] logits can be large.
        token_nll = F.cross_entropy(logits[rows_i, cols - offset].float(), labels[rows_i, cols], reduction="none")
        sums = torch.zeros(len(idx), device=device, dtype=torch.float64).index_add_(0, rows_i, token_nll.double())
        counts = torch.bincount(rows_i, minlength=len(idx)).clamp_min(1)
        nll[idx] = (sums / counts).cpu().numpy()
        for name, layers in read_gates(gates, batch["edit_pos"]).items():
            for layer, values in layers.items():
                gate_out[name][layer][idx] = values
    return nll, gate_out


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *,
             question_key: str = "question", template: str = "plain", batch_size: int = 16,
             max_new_tokens: int = 128, desc: str | None = None) -> list[str]:
    """Greedy continuations of each row's prompt (left-padded batches; stops at EOS or ``max_new_tokens``).

    ``last_prompt`` adapters edit the last prompt token during prefill by themselves. Batching does not
    change the tokens: every row sees exactly its own prompt, positions counted from its first real token.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [prompt_ids(tokenizer, r, template, question_key) for r in rows]
    pad_id = pad_token_id_of(tokenizer)
    eos_id = tokenizer.eos_token_id
    device = model_device(model)
    out: list[str | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for idx in tqdm(batches(order, batch_size), desc=desc, disable=desc is None, leave=False):
        batch = pad_examples([{"input_ids": prompts[i], "prompt_len": len(prompts[i])} for i in idx], pad_id, "left")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                   max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=pad_id,
                                   eos_token_id=eos_id, temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(idx):
            new = generated[row, ids.shape[1]:].tolist()
            if eos_id is not None and eos_id in new:
                new = new[:new.index(eos_id)]
            out[i] = tokenizer.decode(new, skip_special_tokens=True)
    return out  # type: ignore[return-value]
