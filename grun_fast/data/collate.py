"""Forget/retain pairing for training.

The order of forget rows and the retain row paired with each are pure functions of (seed, position in the
run), not of any generator state: a resumed run, or a run split over several processes, sees exactly the
pairs an uninterrupted single-process run sees.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from grun_fast.data.encoding import pad_examples


class ForgetSchedule(Dataset):
    """``epochs`` passes over the forget examples, each pass in its own seeded order.

    Item ``k`` is ``{"step_index": k, "forget_index": i, "forget": example}``; read it sequentially (the
    shuffling is already done here, reproducibly).
    """

    def __init__(self, forget: Sequence[Mapping[str, Any]], epochs: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if len(forget) == 0:
            raise ValueError("the forget set is empty")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.forget = list(forget)
        n = len(self.forget)
        orders = [np.random.default_rng([seed, 1, e]).permutation(n) if shuffle else np.arange(n)
                  for e in range(epochs)]
        self.order = np.concatenate(orders)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = int(self.order[k])
        return {"step_index": int(k), "forget_index": i, "forget": self.forget[i]}


def retain_index_for(step_index: int, n_retain: int, seed: int = 0) -> int:
    """The retain row paired with schedule item ``step_index`` (deterministic, uniform)."""
    return int(np.random.default_rng([seed, 2, step_index]).integers(n_retain))


class PairedCollator:
    """Collates schedule items, pairing each forget row with a seeded random retain row.

    Returns ``forget_*`` and ``retain_*`` tensors (``input_ids, attention_mask, labels, edit_pos``) plus
    ``forget_index`` and ``retain_index`` (row numbers, used to look up per-example caches).
    """

    def __init__(self, retain: Sequence[Mapping[str, Any]], pad_token_id: int, seed: int = 0):
        if len(retain) == 0:
            raise ValueError("the retain set is empty")
        self.retain = list(retain)
        self.pad_token_id = int(pad_token_id)
        self.seed = seed

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        r_idx = [retain_index_for(it["step_index"], len(self.retain), self.seed) for it in items]
        out: dict[str, torch.Tensor] = {}
        for prefix, examples in (("forget", [it["forget"] for it in items]),
                                 ("retain", [self.retain[j] for j in r_idx])):
            for key, value in pad_examples(examples, self.pad_token_id, "right").items():
                out[f"{prefix}_{key}"] = value
        out["forget_index"] = torch.tensor([it["forget_index"] for it in items], dtype=torch.long)
        out["retain_index"] = torch.tensor(r_idx, dtype=torch.long)
        return out
