"""Gates under prompt-format drift: the mean gate on each split's questions in every variant of the format an
adapter was trained with (``grun_fast.data.prompts.format_variants``: trailing space/newline or none after the
answer cue, chat with/without its system prompt, the bare question).

The gate sits at the last prompt token and attention is causal, so it depends on the prompt alone: each
question is run once per variant, prompt only, without the LM head.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from grun_fast.architectures import locate
from grun_fast.data.encoding import pad_examples, pad_token_id_of
from grun_fast.data.prompts import format_variants, prompt_ids_batch, resolve_template
from grun_fast.errors import GRUNError
from grun_fast.evaluation.scoring import batches, edit_at_positions, gate_modules, model_device, read_gates
from grun_fast.evaluation.splits import FORGET, split_kind

PARAPHRASED = "paraphrased_question"


@torch.no_grad()
def prompt_gates(model: torch.nn.Module, tokenizer: Any, questions: Sequence[str], template: str,
                 modules: Mapping[str, Mapping[int, torch.nn.Module]], batch_size: int = 32) -> np.ndarray:
    """[N] mean gate (over the given adapters and layers) at the last prompt token of each question."""
    if not questions:
        return np.zeros(0)
    prompts = prompt_ids_batch(tokenizer, [{"question": q} for q in questions], template)
    pad_id = pad_token_id_of(tokenizer)
    device = model_device(model)
    backbone = locate(model)[0]
    out = np.full(len(prompts), np.nan)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for idx in batches(order, batch_size):
        batch = pad_examples([{"input_ids": prompts[i], "prompt_len": len(prompts[i])} for i in idx], pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with edit_at_positions(model, batch["edit_pos"].to(device)):
            backbone(input_ids=ids, attention_mask=mask, use_cache=False)
        gates = read_gates(modules, batch["edit_pos"])
        values = [v for layers in gates.values() for v in layers.values()]
        out[idx] = np.mean(values, axis=0)
    return out


def format_gates(model: torch.nn.Module, tokenizer: Any, splits: Mapping[str, Sequence[Mapping[str, Any]]],
                 template: str = "auto", adapter_name: str | Sequence[str] | None = None,
                 batch_size: int = 32) -> dict[str, Any]:
    """Mean gate per split under every variant of ``template`` (resolved with ``tokenizer``).

    Returns ``{"format": resolved, "variants": {label: {"format": f, "gates": {column: mean}}}}`` with one
    column per split and, for forget splits, ``"<split> (paraphrased question)"``. Needs an adapter on the model.
    """
    modules = gate_modules(model, adapter_name)
    if not modules or not any(modules.values()):
        raise GRUNError("format_gates needs a model with a GRUN adapter (no gates to read)")
    fmt = resolve_template(template, tokenizer)
    columns: list[tuple[str, list[str]]] = []
    for name, rows in splits.items():
        columns.append((name, [r["question"] for r in rows]))
        if split_kind(name) == FORGET and rows and all(PARAPHRASED in r for r in rows):
            columns.append((f"{name} ({PARAPHRASED.replace('_', ' ')})", [r[PARAPHRASED] for r in rows]))
    was_training = model.training
    model.eval()
    try:
        variants = {}
        for label, variant in format_variants(fmt, tokenizer).items():
            gates = {col: float(np.mean(prompt_gates(model, tokenizer, qs, variant, modules, batch_size)))
                     for col, qs in columns if qs}
            variants[label] = {"format": variant, "gates": gates}
    finally:
        model.train(was_training)
    return {"format": fmt, "variants": variants}


def format_gates_markdown(result: Mapping[str, Any], title: str = "Mean gate per prompt format") -> str:
    """The table of ``format_gates``: one row per variant, one column per split."""
    variants = result["variants"]
    columns = list(next(iter(variants.values()))["gates"]) if variants else []
    lines = [f"## {title} (trained format: {result['format']!r})", "",
             "| variant | format | " + " | ".join(columns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for label, v in variants.items():
        shown = repr(v["format"]).replace("|", "\\|")
        lines.append(f"| {label} | `{shown}` | " + " | ".join(f"{v['gates'].get(c, float('nan')):.3f}"
                                                             for c in columns) + " |")
    return "\n".join(lines) + "\n"
