"""Forget/retain pairing for training.

The order of forget rows and the retain row paired with each are pure functions of (seed, position in the
run), not of any generator state: a resumed run, or a run split over several processes, sees exactly the
pairs an uninterrupted single-process run sees. The same holds for prompt-format augmentation: with several
encodings of each row (one per prompt format variant), the variant a forget or retain row is shown in at a
given position is drawn from (seed, position) too.
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
    shuffling is already done here, reproducibly). ``variants``: further encodings of the same rows (a list
    of lists, each as long as ``forget``; e.g. the rows in other prompt formats): item ``k`` then shows row
    ``i`` in variant ``v = variant_index_for(k, V, seed, "forget")`` (``v = 0``: ``forget`` itself) and its
    ``forget_index`` is ``v * len(forget) + i``, the example's index in ``all_examples``.
    """

    def __init__(self, forget: Sequence[Mapping[str, Any]], epochs: int = 1, seed: int = 0,
                 shuffle: bool = True, variants: Sequence[Sequence[Mapping[str, Any]]] = ()):
        if len(forget) == 0:
            raise ValueError("the forget set is empty")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.forget = list(forget)
        n = len(self.forget)
        self.variants = [self.forget] + [list(v) for v in variants]
        if any(len(v) != n for v in self.variants):
            raise ValueError("every variant must hold one example per forget row")
        self.seed = seed
        orders = [np.random.default_rng([seed, 1, e]).permutation(n) if shuffle else np.arange(n)
                  for e in range(epochs)]
        self.order = np.concatenate(orders)

    @property
    def all_examples(self) -> list[Mapping[str, Any]]:
        """Every encoding of every row, indexed by ``forget_index``."""
        return [e for v in self.variants for e in v]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = int(self.order[k])
        v = variant_index_for(k, len(self.variants), self.seed, "forget")
        return {"step_index": int(k), "forget_index": v * len(self.forget) + i, "forget": self.variants[v][i]}


_ROLES = {"forget": 3, "retain": 4}


def variant_index_for(step_index: int, n_variants: int, seed: int = 0, role: str = "forget") -> int:
    """The variant (0 .. n_variants - 1, uniform) a forget or retain row is shown in at schedule item
    ``step_index`` (deterministic; always 0 with one variant, drawing nothing)."""
    if n_variants <= 1:
        return 0
    return int(np.random.default_rng([seed, _ROLES[role], step_index]).integers(n_variants))


def retain_index_for(step_index: int, n_retain: int, seed: int = 0) -> int:
    """The retain row paired with schedule item ``step_index`` (deterministic, uniform)."""
    return int(np.random.default_rng([seed, 2, step_index]).integers(n_retain))


class PairedCollator:
    """Collates schedule items, pairing each forget row with a seeded random retain row.

    Returns ``forget_*`` and ``retain_*`` tensors (``input_ids, attention_mask, labels, edit_pos``) plus
    ``forget_index`` and ``retain_index`` (example numbers, used to look up per-example caches).
    ``variants``: further encodings of the retain rows (as in ``ForgetSchedule``): the retain row paired with
    item ``k`` is shown in variant ``variant_index_for(k, V, seed, "retain")`` and its ``retain_index`` is
    ``v * len(retain) + j``.
    """

    def __init__(self, retain: Sequence[Mapping[str, Any]], pad_token_id: int, seed: int = 0,
                 variants: Sequence[Sequence[Mapping[str, Any]]] = ()):
        if len(retain) == 0:
            raise ValueError("the retain set is empty")
        self.retain = list(retain)
        self.variants = [self.retain] + [list(v) for v in variants]
        if any(len(v) != len(self.retain) for v in self.variants):
            raise ValueError("every variant must hold one example per retain row")
        self.pad_token_id = int(pad_token_id)
        self.seed = seed

    @property
    def all_examples(self) -> list[Mapping[str, Any]]:
        """Every encoding of every retain row, indexed by ``retain_index``."""
        return [e for v in self.variants for e in v]

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(self.retain)
        r_idx = [retain_index_for(it["step_index"], n, self.seed) for it in items]
        r_var = [variant_index_for(it["step_index"], len(self.variants), self.seed, "retain") for it in items]
        out: dict[str, torch.Tensor] = {}
        for prefix, examples in (("forget", [it["forget"] for it in items]),
                                 ("retain", [self.variants[v][j] for v, j in zip(r_var, r_idx)])):
            for key, value in pad_examples(examples, self.pad_token_id, "right").items():
                out[f"{prefix}_{key}"] = value
        out["forget_index"] = torch.tensor([it["forget_index"] for it in items], dtype=torch.long)
        out["retain_index"] = torch.tensor([v * n + j for v, j in zip(r_var, r_idx)], dtype=torch.long)
        return out
