"""The one place where a row becomes prompt text and prompt token ids.

Training and evaluation both call these functions, so the prompt a model is unlearned with is the prompt
it is scored with (the reference code fine-tuned on "Question: q\\nAnswer: " and unlearned on
"Question: q \\nAnswer: "; that mismatch is not reproduced here).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

PLAIN_TEMPLATE = "Question: {question}\nAnswer: "
TEMPLATES = ("plain", "chat")


def check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return template


def format_prompt(question: str, tokenizer: Any = None, template: str = "plain") -> str:
    """Prompt text for a question: the plain QA template, or the tokenizer's chat template."""
    check_template(template)
    if template == "plain":
        return PLAIN_TEMPLATE.format(question=question)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' needs a tokenizer with a chat template; this tokenizer has none "
                         "(use template='plain')")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def row_prompt(row: Mapping[str, Any], tokenizer: Any = None, template: str = "plain",
               question_key: str = "question") -> str:
    """Prompt text of a data row.

    Rows with a ``prompt`` key (document chunks) are used verbatim: a document prefix is not a question.
    Other rows are formatted from ``row[question_key]``.
    """
    if "prompt" in row:
        return row["prompt"]
    return format_prompt(row[question_key], tokenizer, template)


def _adds_special_tokens(row: Mapping[str, Any], template: str) -> bool:
    # A chat template writes its own BOS; adding another would shift every position by one.
    return not (template == "chat" and "prompt" not in row)


def _tokenize(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of many texts in one tokenizer call (a fast tokenizer encodes a list in parallel; per-text
    calls cost more than the encoding itself on short QA rows)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]


def prompt_ids_batch(tokenizer: Any, rows: Sequence[Mapping[str, Any]], template: str = "plain",
                     question_key: str = "question") -> list[list[int]]:
    """Token ids of each row's prompt, exactly as generation and teacher-forced scoring must see them.

    Never empty: an empty prompt (document mode) becomes the BOS token (EOS when there is no BOS), so the
    edit always has a position, ``len(ids) - 1``.
    """
    texts = [row_prompt(row, tokenizer, template, question_key) for row in rows]
    special = [_adds_special_tokens(row, template) for row in rows]
    out: list[list[int]] = [[] for _ in rows]
    for flag in (True, False):
        chosen = [i for i, s in enumerate(special) if s == flag]
        for i, ids in zip(chosen, _tokenize(tokenizer, [texts[i] for i in chosen], flag)):
            out[i] = ids
    if any(not ids for ids in out):
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("the prompt is empty and the tokenizer has neither a BOS nor an EOS token to "
                             "start it with")
        out = [ids or [start] for ids in out]
    return out


def prompt_ids(tokenizer: Any, row: Mapping[str, Any], template: str = "plain",
               question_key: str = "question") -> list[int]:
    """``prompt_ids_batch`` of one row."""
    return prompt_ids_batch(tokenizer, [row], template, question_key)[0]


def answer_ids_batch(tokenizer: Any, answers: Sequence[str], add_eos: bool = True) -> list[list[int]]:
    """Token ids of answer continuations (no BOS), with EOS appended so a model learns where to stop."""
    out = _tokenize(tokenizer, answers, add_special_tokens=False)
    if add_eos and tokenizer.eos_token_id is not None:
        for ids in out:
            ids.append(tokenizer.eos_token_id)
    return out


def answer_ids(tokenizer: Any, answer: str, add_eos: bool = True) -> list[int]:
    """``answer_ids_batch`` of one answer."""
    return answer_ids_batch(tokenizer, [answer], add_eos)[0]
