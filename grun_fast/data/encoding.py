"""Rows -> token ids -> padded training tensors.

Each example is prompt ids + answer ids: the prompt tokenised on its own (exactly what generation sees),
the answer's ids those the tokenizer gives the joined text after the prompt's
(``prompts.encode_prompts_answers``). ``labels`` are -100 on the prompt and on padding; ``edit_pos`` =
prompt_len - 1 is the last prompt token, the position GRUN edits in ``last_prompt`` mode.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from grun_fast.data.prompts import encode_prompts_answers
from grun_fast.errors import GRUNError

IGNORE_INDEX = -100


def encode_rows(tokenizer: Any, rows: Sequence[Mapping[str, Any]], template: str = "auto",
                max_length: int = 512, answer_key: str = "answer", question_key: str = "question",
                add_eos: bool = True, encoding: str = "grun") -> list[dict[str, Any]]:
    """Rows -> ``[{"input_ids": list[int], "prompt_len": int}]`` (prompts and answers each tokenised in one
    call; ``encoding``: ``prompts.ENCODINGS``).

    Longer than ``max_length``: the answer is cut first; a prompt that alone does not leave room for one
    answer token loses its beginning (its end, the edited token, is kept).
    """
    if max_length < 2:
        raise GRUNError(f"max_length must be at least 2 (one prompt and one answer token), got {max_length}")
    missing = next((i for i, row in enumerate(rows) if not isinstance(row.get(answer_key), str)), None)
    if missing is not None:
        raise GRUNError(f"row {missing} has no string {answer_key!r}: {dict(rows[missing])!r:.200}")
    prompts, answers = encode_prompts_answers(tokenizer, rows, [row[answer_key] for row in rows], template,
                                              question_key, encoding)
    if add_eos and tokenizer.eos_token_id is not None:
        answers = [a + [tokenizer.eos_token_id] for a in answers]
    out = []
    for i, (row, p, a) in enumerate(zip(rows, prompts, answers)):
        if not a:
            raise GRUNError(f"row {i} has an empty answer after tokenisation: {dict(row)!r:.200}")
        if len(p) > max_length - 1:
            p = p[len(p) - (max_length - 1):]
        a = a[: max_length - len(p)]
        out.append({"input_ids": p + a, "prompt_len": len(p)})
    return out


def encode_example(tokenizer: Any, row: Mapping[str, Any], template: str = "auto", max_length: int = 512,
                   answer_key: str = "answer", question_key: str = "question",
                   add_eos: bool = True) -> dict[str, Any]:
    """``encode_rows`` of one row."""
    return encode_rows(tokenizer, [row], template, max_length, answer_key, question_key, add_eos)[0]


def pad_examples(examples: Sequence[Mapping[str, Any]], pad_token_id: int,
                 padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Encoded examples -> ``input_ids, attention_mask, labels, edit_pos`` tensors.

    Right padding (training) keeps ``edit_pos = prompt_len - 1``; left padding (batched generation) shifts
    it by each row's pad count, which is accounted for here.
    """
    if not examples:
        raise GRUNError("cannot pad an empty batch")
    if padding_side not in ("right", "left"):
        raise GRUNError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    edit_pos = torch.empty(n, dtype=torch.long)
    for i, e in enumerate(examples):
        ids = torch.as_tensor(e["input_ids"], dtype=torch.long)
        k, pl = len(ids), int(e["prompt_len"])
        start = 0 if padding_side == "right" else width - k
        input_ids[i, start:start + k] = ids
        attention_mask[i, start:start + k] = 1
        labels[i, start + pl:start + k] = ids[pl:]
        edit_pos[i] = start + pl - 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "edit_pos": edit_pos}


def pad_token_id_of(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise GRUNError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return int(pid)


def tokenize_rows(tokenizer: Any, rows: Sequence[Mapping[str, Any]], template: str = "auto",
                  max_length: int = 512, padding_side: str = "right", answer_key: str = "answer",
                  question_key: str = "question", add_eos: bool = True) -> dict[str, torch.Tensor]:
    """Rows -> one padded batch (``input_ids, attention_mask, labels, edit_pos``)."""
    examples = encode_rows(tokenizer, rows, template, max_length, answer_key, question_key, add_eos)
    return pad_examples(examples, pad_token_id_of(tokenizer), padding_side)
