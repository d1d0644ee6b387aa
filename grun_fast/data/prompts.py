"""The one place where a row becomes prompt text and prompt token ids.

Training and evaluation both call these functions, so the prompt a model is unlearned with is the prompt
it is scored with (the reference code fine-tuned on "Question: q\\nAnswer: " and unlearned on
"Question: q \\nAnswer: "; that mismatch is not reproduced here).
"""
from __future__ import annotations

from typing import Any, Mapping

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


def prompt_ids(tokenizer: Any, row: Mapping[str, Any], template: str = "plain",
               question_key: str = "question") -> list[int]:
    """Token ids of a row's prompt, exactly as generation and teacher-forced scoring must see them.

    Never empty: an empty prompt (document mode) becomes the BOS token (EOS when there is no BOS), so the
    edit always has a position, ``len(ids) - 1``.
    """
    text = row_prompt(row, tokenizer, template, question_key)
    ids = list(tokenizer(text, add_special_tokens=_adds_special_tokens(row, template))["input_ids"])
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("the prompt is empty and the tokenizer has neither a BOS nor an EOS token to "
                             "start it with")
        ids = [start]
    return ids


def answer_ids(tokenizer: Any, answer: str, add_eos: bool = True) -> list[int]:
    """Token ids of an answer continuation (no BOS), with EOS appended so a model learns where to stop."""
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids
