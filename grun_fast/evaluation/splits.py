"""Evaluation splits: which fields each kind of split needs, checking them, and assembling the TOFU ones.

Three kinds, by split name (GRUN.md section 5):
- ``forget*``: probability ``exp(-Lbar)``, truth ratio ``min(t, 1/t)``, plus the paraphrased-question check;
- ``retain*``: probability ``exp(-Lbar)``, truth ratio ``max(0, 1 - 1/t)``;
- anything else (real_authors, world_facts, ...): probability normalised over the answer options, truth ratio
  ``max(0, 1 - 1/t)`` with the answer itself standing in for the (absent) paraphrase.
All checks run before any model work, so a bad file fails in seconds, not after an hour of scoring.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from grun_fast.errors import GRUNError

FORGET, RETAIN, KNOWLEDGE = "forget", "retain", "knowledge"
REQUIRED_FIELDS = {
    FORGET: ("question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question"),
    RETAIN: ("question", "answer", "paraphrased_answer", "perturbed_answer"),
    KNOWLEDGE: ("question", "answer", "perturbed_answer"),
}


def split_kind(name: str) -> str:
    if name.startswith("forget"):
        return FORGET
    if name.startswith("retain"):
        return RETAIN
    return KNOWLEDGE


def validate_split(name: str, rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Check a split has rows and every field its kind needs; returns the rows as a list of dicts."""
    rows = list(rows)
    if not rows:
        raise GRUNError(f"split {name!r} is empty: nothing to evaluate")
    required = REQUIRED_FIELDS[split_kind(name)]
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise GRUNError(f"split {name!r}, row {i}: expected an object, got {type(row).__name__}")
        for key in required:
            if key not in row:
                raise GRUNError(f"split {name!r} ({split_kind(name)} split), row {i}: missing field {key!r} "
                                f"(needs {', '.join(required)}; the row has {', '.join(sorted(row)) or 'nothing'})")
            value = row[key]
            if key == "perturbed_answer":
                if (isinstance(value, str) or not isinstance(value, Sequence) or not value
                        or not all(isinstance(v, str) and v.strip() for v in value)):
                    raise GRUNError(f"split {name!r}, row {i}: 'perturbed_answer' must be a non-empty list of "
                                    f"non-empty strings, got {value!r:.120}")
            elif not isinstance(value, str) or not value.strip():
                raise GRUNError(f"split {name!r}, row {i}: field {key!r} must be a non-empty string, "
                                f"got {value!r:.120}")
    return [dict(r) for r in rows]


def align_perturbed(name: str, rows: Sequence[Mapping[str, Any]], perturbed: Sequence[Mapping[str, Any]]
                    ) -> list[dict]:
    """Merge a split's rows with its ``_perturbed`` rows, which must hold the same questions in the same order."""
    if len(rows) != len(perturbed):
        raise GRUNError(f"{name}_perturbed has {len(perturbed)} rows but {name} has {len(rows)}: the files do "
                        "not align")
    merged = []
    for i, (row, extra) in enumerate(zip(rows, perturbed)):
        for key in ("question", "answer"):
            if key in extra and str(extra[key]).strip() != str(row.get(key, "")).strip():
                raise GRUNError(f"{name}_perturbed row {i} does not align with {name}: {key} "
                                f"{str(extra[key])!r:.80} vs {str(row.get(key))!r:.80}")
        merged.append({**row, **extra})
    return merged


def tofu_eval_splits(data: str | os.PathLike, forget_split: str, max_rows: int | None = None,
                     utility: bool = True) -> dict[str, list[dict]]:
    """The TOFU evaluation splits, checked: ``forget_split`` (with ``<forget_split>_perturbed``) and, with
    ``utility``, ``retain`` (``retain_perturbed``), ``real_authors`` and ``world_facts`` (each merged with its
    ``_perturbed`` file). ``max_rows`` keeps the first rows of each split (quick runs and CI)."""
    from grun_fast.data.loading import load_tofu

    if not forget_split.startswith("forget"):
        raise GRUNError(f"the forget split must be a TOFU forget split (forget01, forget05, forget10), "
                        f"got {forget_split!r}")
    if max_rows is not None and max_rows < 1:
        raise GRUNError(f"max_rows must be >= 1, got {max_rows}")

    def load(split: str) -> list[dict]:
        try:
            return load_tofu(split, data)
        except (FileNotFoundError, ValueError) as e:
            raise GRUNError(f"TOFU split {split!r}: {e}") from None

    plan = [(forget_split, forget_split)]
    if utility:
        plan += [("retain", None), ("real_authors", "real_authors"), ("world_facts", "world_facts")]
    splits = {}
    for name, base in plan:
        perturbed = load(f"{base or name}_perturbed")
        rows = perturbed if base is None else align_perturbed(base, load(base), perturbed)
        splits[name] = validate_split(name, rows[:max_rows] if max_rows else rows)
    return splits
