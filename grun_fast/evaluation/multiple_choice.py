"""WMDP/MMLU-style multiple choice: prediction = argmax of the next-token probabilities of the option letters.

Rows: ``question``, ``choices`` (2 to 26 strings), ``answer`` (the index of the correct choice, or its letter).
The prompt lists the lettered choices and ends with ``"Answer:"``; the model's next-token distribution is
read at that last prompt token, which is also where a ``last_prompt`` adapter edits and gates.
"""
from __future__ import annotations

import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from grun_fast.errors import GRUNError
from grun_fast.evaluation import metrics
from grun_fast.data.encoding import pad_examples, pad_token_id_of
from grun_fast.evaluation.scoring import batches, edit_at_positions, gate_modules, model_device, read_gates

LETTERS = string.ascii_uppercase


def validate_mc_rows(rows: Sequence[Mapping[str, Any]], what: str = "multiple choice") -> list[dict]:
    """Check the fields and turn ``answer`` into an index; raises before any model work."""
    rows = list(rows)
    if not rows:
        raise GRUNError(f"{what}: no rows")
    out = []
    for i, row in enumerate(rows):
        for key in ("question", "choices", "answer"):
            if key not in row:
                raise GRUNError(f"{what}, row {i}: missing field {key!r} (needs question, choices, answer)")
        choices = row["choices"]
        if (isinstance(choices, str) or not isinstance(choices, Sequence) or not 2 <= len(choices) <= 26
                or not all(isinstance(c, str) for c in choices)):
            raise GRUNError(f"{what}, row {i}: 'choices' must be a list of 2 to 26 strings, got {choices!r:.120}")
        answer = row["answer"]
        if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
            answer = LETTERS.index(answer.strip().upper())
        if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)) or not 0 <= answer < len(choices):
            raise GRUNError(f"{what}, row {i}: 'answer' must be a choice index in [0, {len(choices)}) or its "
                            f"letter, got {row['answer']!r}")
        out.append({"question": str(row["question"]), "choices": list(choices), "answer": int(answer)})
    return out


def load_mc_file(path: str | os.PathLike, max_rows: int | None = None) -> list[dict]:
    from grun_fast.data.loading import load_qa_file

    path = Path(path)
    if not path.is_file():
        raise GRUNError(f"multiple-choice file not found: {path}")
    try:
        rows = load_qa_file(path, validate=False)
    except ValueError as e:
        raise GRUNError(str(e)) from None
    return validate_mc_rows(rows[:max_rows] if max_rows else rows, str(path))


def mc_prompt(row: Mapping[str, Any]) -> str:
    lines = [row["question"].strip()]
    lines += [f"{LETTERS[j]}. {c}" for j, c in enumerate(row["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def letter_token_ids(tokenizer: Any, n: int) -> list[int]:
    """One token id per option letter: ``" A"`` as the model would write it after "Answer:", else ``"A"``."""
    for fmt in (" {}", "{}"):
        ids = [tokenizer(fmt.format(LETTERS[j]), add_special_tokens=False)["input_ids"] for j in range(n)]
        if all(len(t) == 1 for t in ids) and len({t[0] for t in ids}) == n:
            return [t[0] for t in ids]
    raise GRUNError(f"the tokenizer has no single token for each of the letters {LETTERS[:n]}")


@torch.no_grad()
def evaluate_multiple_choice(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]],
                             adapter_name: str | Sequence[str] | None = None, batch_size: int = 16,
                             progress: bool = True) -> dict[str, Any]:
    """Accuracy (argmax over the option letters' next-token probabilities) and the mean gate per layer."""
    rows = validate_mc_rows(rows)
    modules = gate_modules(model, adapter_name)
    n_max = max(len(r["choices"]) for r in rows)
    letters = letter_token_ids(tokenizer, n_max)
    prompts = [list(tokenizer(mc_prompt(r))["input_ids"]) for r in rows]
    pad_id, device = pad_token_id_of(tokenizer), model_device(model)
    scores: list[list[float] | None] = [None] * len(rows)
    gates = {a: {layer: np.full(len(rows), np.nan) for layer in m} for a, m in modules.items()}
    order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))
    was_training = model.training
    model.eval()
    try:
        for idx in tqdm(batches(order, batch_size), desc="multiple choice" if progress else None,
                        disable=not progress, leave=False):
            batch = pad_examples([{"input_ids": prompts[i], "prompt_len": len(prompts[i])} for i in idx], pad_id)
            pos = batch["edit_pos"].to(device)
            with edit_at_positions(model, pos):
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
            logp = logits[torch.arange(len(idx), device=device), pos].float().log_softmax(-1)
            for k, i in enumerate(idx):
                scores[i] = logp[k, letters[:len(rows[i]["choices"])]].tolist()
            for a, layers in read_gates(modules, batch["edit_pos"]).items():
                for layer, v in layers.items():
                    gates[a][layer][idx] = v
    finally:
        model.train(was_training)
    answers = [r["answer"] for r in rows]
    return {
        "n": len(rows),
        "accuracy": metrics.multiple_choice_accuracy(scores, answers),
        "gate": {a: {str(layer): float(np.mean(v)) for layer, v in m.items()} for a, m in gates.items()},
        "predictions": [int(np.argmax(s)) for s in scores],
    }
