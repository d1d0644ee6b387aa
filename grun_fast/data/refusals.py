"""Refusal answers for gated IDK unlearning (the reference code's list is missing; this one is ours)."""
from __future__ import annotations

import random
from typing import Sequence

REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure about that.",
    "I don't have that information.",
    "I can't answer that question.",
    "That is something I don't know.",
    "I have no information about that.",
    "I'm afraid I can't help with that.",
    "I don't know the answer to that.",
    "Sorry, I'm not able to answer that.",
    "I have no knowledge of that.",
    "That's not something I can tell you.",
    "I'm unable to provide an answer to that.",
    "I don't have any details on that.",
    "I'm not aware of that.",
    "I couldn't say.",
    "I really have no idea.",
    "That is beyond what I know.",
    "I don't recall anything about that.",
    "I can't provide information on that topic.",
    "Unfortunately, I don't know.",
    "I have nothing to share on that.",
    "I'm not familiar with that.",
    "I don't have an answer for that.",
    "No idea, I'm afraid.",
    "I'm not in a position to answer that.",
)


def with_refusals(rows: Sequence[dict], seed: int = 0, refusals: Sequence[str] = REFUSALS) -> list[dict]:
    """Copies of ``rows`` whose ``answer`` is a refusal drawn at random (seeded); the original answer is
    kept under ``original_answer``."""
    if not refusals:
        raise ValueError("the refusal list is empty")
    rng = random.Random(seed)
    return [{**r, "answer": rng.choice(list(refusals)), "original_answer": r.get("answer")} for r in rows]
