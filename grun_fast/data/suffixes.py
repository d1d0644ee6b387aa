"""Answer suffixes: extra forget rows whose answer starts at a later word.

An edit trained on whole answers learns to suppress them after the answer's own first words. A reworded answer
(TOFU's paraphrased answers) reaches the same facts, e.g. a memorised book title, after other words, and the
model still finds them likely: the truth ratio, and with it forget quality, stays off. Training on suffixes as
well teaches the edit to suppress the facts wherever in an answer they start. Built from the forget rows only.
"""
from __future__ import annotations

import random
from typing import Sequence

MIN_SUFFIX_WORDS = 3


def with_answer_suffixes(rows: Sequence[dict], n: int, seed: int = 0) -> list[dict]:
    """``rows`` followed by ``n`` copies of each row (seeded) whose answer drops its first 1..len-3 words
    (whitespace-split); answers of 3 words or fewer get no copies."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of answer suffixes must be an integer >= 0, got {n!r}")
    rng, extra = random.Random(seed + 321), []
    for row in rows:
        words = row["answer"].split()
        if len(words) <= MIN_SUFFIX_WORDS:
            continue
        for _ in range(n):
            start = rng.randint(1, len(words) - MIN_SUFFIX_WORDS)
            extra.append({**row, "answer": " ".join(words[start:])})
    return list(rows) + extra
