"""Loaders: TOFU (a local folder or the hub), generic QA files (JSONL/JSON/CSV), plain-text documents.

Every loader returns a list of dicts. QA rows carry ``question`` and ``answer`` (plus whatever else the
file holds); document rows carry ``prompt`` (used verbatim, see ``prompts.row_prompt``) and ``answer``.
Every failure a user can cause (a missing file or folder, an unknown split, a bad line, a missing column or
field) raises ``GRUNError`` naming the file and the row or line.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from grun_fast.errors import GRUNError

TOFU_HUB_NAME = "locuslab/TOFU"
TOFU_ENV_VAR = "GRUN_TOFU_DIR"
QA_SUFFIXES = (".jsonl", ".json", ".csv")
TEXT_SUFFIXES = (".txt", ".md")


def validate_rows(rows: Sequence[dict], what: str = "rows", keys: Iterable[str] = ("question", "answer")
                  ) -> list[dict]:
    """Check every row has non-empty string fields ``keys`` (``prompt`` may stand in for ``question``)."""
    try:
        rows = list(rows)
    except TypeError:
        raise GRUNError(f"{what}: expected a list of rows, got {type(rows).__name__}") from None
    if not rows:
        raise GRUNError(f"{what}: no rows (the set is empty)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise GRUNError(f"{what}: row {i} is a {type(row).__name__}, not an object with question/answer")
        for key in keys:
            if key == "question" and "prompt" in row:
                if not isinstance(row["prompt"], str):
                    raise GRUNError(f"{what}: row {i}: 'prompt' must be a string")
                continue
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                have = ", ".join(sorted(map(str, row))) or "nothing"
                raise GRUNError(f"{what}: row {i} has no non-empty string {key!r} (it has: {have})")
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GRUNError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise GRUNError(f"{path}: cannot be read ({e.strerror or e})") from None


def _read_json_rows(path: Path) -> list[dict]:
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GRUNError(f"{path}: invalid JSON: {e}") from None
        return data
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise GRUNError(f"{path}, line {n}: invalid JSON ({e.msg} at column {e.colno}): "
                                f"{line.strip()[:80]!r}") from None
    return rows


def _read_csv_rows(path: Path, validate: bool) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        try:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if validate:
                need = ["answer"] if "prompt" in columns else ["question", "answer"]
                missing = [c for c in need if c not in columns]
                if missing:
                    raise GRUNError(f"{path}: no {' or '.join(map(repr, missing))} column (columns: "
                                    f"{', '.join(columns) or 'none'})")
            return [dict(r) for r in reader]
        except UnicodeDecodeError as e:
            raise GRUNError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except csv.Error as e:
            raise GRUNError(f"{path}, line {reader.line_num}: invalid CSV: {e}") from None


def load_qa_file(path: str | os.PathLike, validate: bool = True) -> list[dict]:
    """Rows from a JSON-lines, JSON-array or CSV file with ``question`` and ``answer`` columns."""
    path = Path(path)
    if not path.is_file():
        raise GRUNError(f"no such data file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv_rows(path, validate)
    elif suffix in (".json", ".jsonl"):
        rows = _read_json_rows(path)
    else:
        raise GRUNError(f"{path}: unsupported file type {suffix!r} (use {', '.join(QA_SUFFIXES)})")
    return validate_rows(rows, str(path)) if validate else rows


def chunk_document(text: str, chunk_words: int = 128, prefix_words: int | None = 16,
                   source: str = "") -> list[dict]:
    """Split a document into word chunks and make one row per chunk.

    ``prefix_words`` > 0: prompt = the first words of the chunk, answer = the rest (forget the continuation
    given its beginning). ``prefix_words`` None or 0 (document mode): empty prompt, answer = the whole chunk
    (the edit sits on the BOS token, so use ``positions="all"`` or a mask for such rows in practice).
    """
    if isinstance(chunk_words, bool) or not isinstance(chunk_words, int) or chunk_words < 2:
        raise GRUNError(f"chunk_words must be an integer >= 2, got {chunk_words!r}")
    if prefix_words is not None and (isinstance(prefix_words, bool) or not isinstance(prefix_words, int)
                                     or not 0 <= prefix_words < chunk_words):
        raise GRUNError(f"prefix_words must be None or an integer in [0, chunk_words), got {prefix_words!r}")
    words = text.split()
    rows = []
    for c, start in enumerate(range(0, len(words), chunk_words)):
        chunk = words[start:start + chunk_words]
        k = prefix_words or 0
        if k and len(chunk) <= k:   # a tail too short to split: keep it whole rather than drop it
            k = max(1, len(chunk) // 2) if len(chunk) > 1 else 0
        if k:
            row = {"prompt": " ".join(chunk[:k]), "answer": " " + " ".join(chunk[k:])}
        else:
            row = {"prompt": "", "answer": " ".join(chunk)}
        row.update(source=source, chunk=c)
        rows.append(row)
    return rows


def load_documents(paths: str | os.PathLike | Sequence[str | os.PathLike], chunk_words: int = 128,
                   prefix_words: int | None = 16) -> list[dict]:
    """Rows from plain-text documents (files, or folders of .txt/.md files), chunked by ``chunk_document``."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in TEXT_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise GRUNError(f"no such document or folder: {p}")
    rows = []
    for f in files:
        rows += chunk_document(_read_text(f), chunk_words, prefix_words, source=str(f))
    if not rows:
        raise GRUNError(f"no text found in {', '.join(map(str, paths))}")
    return rows


def default_tofu_dir() -> str | None:
    return os.environ.get(TOFU_ENV_VAR)


def load_tofu(split: str, data: str | os.PathLike | None = None) -> list[dict]:
    """A TOFU split (``forget01``, ``retain99``, ``forget01_perturbed``, ``world_facts``, ...).

    ``data``: a folder of TOFU JSON-lines files, or ``"locuslab/TOFU"`` for the hub (through ``datasets``;
    needs internet or a local cache). None: the folder in ``$GRUN_TOFU_DIR``.
    """
    data = default_tofu_dir() if data is None else data
    if data is None:
        raise GRUNError(f"where is TOFU? pass a folder or {TOFU_HUB_NAME!r}, or set ${TOFU_ENV_VAR}")
    if str(data) == TOFU_HUB_NAME:
        return _load_tofu_hub(split)
    folder = Path(data)
    if not folder.is_dir():
        raise GRUNError(f"TOFU folder not found: {folder}")
    path = folder / f"{split}.json"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.json"))
        raise GRUNError(f"no TOFU split {split!r} in {folder} (have: {', '.join(have) or 'none'})")
    return validate_rows(_read_json_rows(path), f"TOFU {split} ({path})")


def _load_tofu_hub(split: str) -> list[dict]:
    try:
        import datasets
        ds = datasets.load_dataset(TOFU_HUB_NAME, split)
    except Exception as e:  # offline, missing cache, unknown config: all surface the same way to a user
        raise GRUNError(
            f"could not load {TOFU_HUB_NAME!r} split {split!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). It needs internet access or a local datasets "
            f"cache; otherwise pass a folder of TOFU JSON-lines files (e.g. --data path/to/tofu)") from e
    part = ds["train"] if hasattr(ds, "keys") and "train" in ds.keys() else ds
    return validate_rows([dict(r) for r in part], f"TOFU {split}")


def load_rows(spec: str | os.PathLike, data: str | os.PathLike | None = None, chunk_words: int = 128,
              prefix_words: int | None = 16) -> list[dict]:
    """Rows from a file (.jsonl/.json/.csv QA rows, .txt/.md documents), a folder of documents, or a TOFU
    split name looked up in ``data`` (a folder or ``"locuslab/TOFU"``)."""
    p = Path(spec)
    if p.is_file():
        if p.suffix.lower() in TEXT_SUFFIXES:
            return load_documents(p, chunk_words, prefix_words)
        return load_qa_file(p)
    if p.is_dir():
        return load_documents(p, chunk_words, prefix_words)
    if p.suffix.lower() in QA_SUFFIXES + TEXT_SUFFIXES or os.sep in str(spec):
        raise GRUNError(f"no such data file: {spec}")
    return load_tofu(str(spec), data)
