"""The workload both sides of the training benchmark run: config, token rows, GD loss (torch only).

Imported by ref_step.py (reference venv) and bench/bench_training_vs_reference.py (project venv), so
both time the same model shape on the same token rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_PATH = Path(__file__).with_name("config.json")


def load_config(path: Path = CONFIG_PATH) -> dict:
    return json.loads(Path(path).read_text())


def make_batches(cfg: dict, n_batches: int = 2) -> list[dict]:
    """Random token rows of seq_len tokens, no padding; labels only on the answer part (after the
    prompt); `positions` = prompt_len - 1, the last prompt token, where the edit goes."""
    g = torch.Generator().manual_seed(cfg["seed"])
    vocab, bsz, seq = cfg["model"]["vocab_size"], cfg["batch"], cfg["seq_len"]
    lo, hi = cfg["prompt_len_range"]
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (bsz, seq), generator=g)
        prompt_len = torch.randint(lo, hi + 1, (bsz,), generator=g)
        labels = ids.clone()
        labels[torch.arange(seq)[None, :] < prompt_len[:, None]] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "positions": prompt_len - 1})
    return out


def gd_loss(nll_forget: torch.Tensor, nll_retain: torch.Tensor, gate_forget: torch.Tensor,
            gate_retain: torch.Tensor) -> torch.Tensor:
    """GRUN's gated GD objective: -NLL_f + 2 NLL_r + 10 BCE(gates; forget -> 1, retain -> 0)."""
    gates = torch.cat([gate_forget, gate_retain]).float().clamp(1e-6, 1 - 1e-6)
    target = torch.cat([torch.ones_like(gate_forget), torch.zeros_like(gate_retain)]).float()
    bce = torch.nn.functional.binary_cross_entropy(gates, target)
    return -nll_forget + 2.0 * nll_retain + 10.0 * bce
