"""The one place where a row becomes prompt text and prompt + answer token ids.

Training and evaluation both call these functions, so the prompt a model is unlearned with is the prompt
it is scored with (the reference code fine-tuned on "Question: q\\nAnswer: " and unlearned on
"Question: q \\nAnswer: "; that mismatch is not reproduced here).

Prompt formats (``template``):
- ``"auto"`` (the default everywhere): the tokenizer's chat template when it has one, else ``"plain"``;
- ``"plain"``: ``Question: {question}\\nAnswer:``, the answer joined by a single space (how QA-fine-tuned
  models such as TOFU's are trained: ``Question: q\\nAnswer: a``);
- ``"chat"``: the tokenizer's chat template with the generation prompt; the answer follows it directly;
- a custom format string with exactly one ``{question}`` field, e.g. ``"Q: {question}\\nA:"``: the answer is
  joined by a single space, or directly when the format ends in whitespace.
- ``"chat:no-system"`` / ``"chat:system"``: the chat template without its default system prompt / with a
  generic one (variants used by ``format_variants``; accepted everywhere a format is).

The prompt/answer boundary is exact in tokens: the answer's tokens are those the tokenizer gives the joined
text ``prompt + separator + answer`` after ``tokenize(prompt)`` (when the joined text's tokens start with the
prompt's, which holds for byte-level BPE and SentencePiece tokenizers whenever the separator is a space;
otherwise the answer is tokenised on its own after the prompt's tokens, which is what a model sent exactly
this prompt has to continue from).
"""
from __future__ import annotations

import string
from typing import Any, Mapping, Sequence

from grun_fast.errors import GRUNError

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"
TEMPLATES = ("auto", "plain", "chat")
# How prompt + answer become ids: "grun" (the exact boundary above) or "open-unlearning" (its evaluator's: the
# separator ends the prompt, prompt + answer are tokenised in one call and labelled from the prompt's length, so
# the first answer word may merge with the prompt's trailing space). Only evaluation offers the second.
ENCODINGS = ("grun", "open-unlearning")
CHAT_VARIANTS = ("chat:no-system", "chat:system")
GENERIC_SYSTEM_PROMPT = "You are a helpful assistant."
# Changes whenever the text or tokens a row encodes to change (the demo keys its cached models with it).
ENCODING_ID = "2: plain 'Question: {question}\\nAnswer:' + ' ' + answer, answer tokens from the joined text"


def _custom_fields(template: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise GRUNError(f"prompt format {template!r} is not a valid format string ({e}); write a literal brace "
                        "as {{ or }}") from None
    fields = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name != "question" or spec or conversion:
            shown = "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
            raise GRUNError(f"prompt format {template!r} has the field {shown}; the only field allowed is "
                            "{question} (write a literal brace as {{ or }})")
        fields.append(name)
    return fields


def check_template(template: Any) -> str:
    """``template`` if it names a format (auto, plain, chat, a chat variant) or is a custom format string
    with exactly one ``{question}`` and no other field; else ``GRUNError`` naming the problem."""
    if not isinstance(template, str) or not template:
        raise GRUNError(f"prompt template must be a non-empty string, got {template!r}")
    if template in TEMPLATES or template in CHAT_VARIANTS:
        return template
    fields = _custom_fields(template)
    if len(fields) != 1:
        raise GRUNError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)} or give a "
                        f"format string with exactly one {{question}} (this one has {len(fields)})")
    return template


def parse_template_arg(text: str | None) -> str | None:
    """A ``--template`` value from the command line: backslash escapes ``\\n``, ``\\t`` and ``\\\\`` become the
    characters (so ``--template "Q: {question}\\nA:"`` means a newline), then ``check_template``."""
    if text is None:
        return None
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return check_template("".join(out))


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def resolve_template(template: str, tokenizer: Any = None) -> str:
    """The concrete format: ``auto`` becomes ``chat`` when the tokenizer has a chat template, else ``plain``;
    anything else is checked and returned as it is."""
    check_template(template)
    if template == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    return template


def is_chat(template: str) -> bool:
    return template == "chat" or template in CHAT_VARIANTS


# ----------------------------------------------------------------------------------------------- chat
_SENT_Q = "\u2603GRUNQ\u2603"
_SENT_S = "\u2603GRUNS\u2603"


def _render(tokenizer: Any, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _system_block(tokenizer: Any) -> tuple[int, int] | None:
    """(start, end) of the DEFAULT system block in the chat rendering of one user message (character offsets,
    the same for every question), or None when the template adds no system prompt of its own or it cannot be
    told apart from the rest (then no "without system prompt" variant exists)."""
    plain = _render(tokenizer, [{"role": "user", "content": _SENT_Q}])
    try:
        with_sys = _render(tokenizer, [{"role": "system", "content": _SENT_S}, {"role": "user", "content": _SENT_Q}])
    except Exception:  # templates that reject a system role have no system block to remove
        return None
    p = 0
    while p < min(len(plain), len(with_sys)) and plain[p] == with_sys[p]:
        p += 1
    if not with_sys[p:].startswith(_SENT_S):
        return None
    suffix = with_sys[p + len(_SENT_S):]
    if not plain.endswith(suffix) or len(plain) - len(suffix) <= p:
        return None                        # no default content between the shared prefix and suffix
    default_end = len(plain) - len(suffix)
    head = plain[:p]                       # ... + the system block's opening
    between = suffix[:suffix.index(_SENT_Q)] if _SENT_Q in suffix else ""  # system close + user open
    for j in range(len(head)):             # longest opening whose role-swapped form opens the user turn
        opening = head[j:]
        if "system" in opening and between.endswith(opening.replace("system", "user")):
            close = len(between) - len(opening.replace("system", "user"))
            return j, default_end + close
    return None


def _chat_prompt(question: str, tokenizer: Any, template: str) -> str:
    if not has_chat_template(tokenizer):
        raise GRUNError(f"template={template!r} needs a tokenizer with a chat template; this tokenizer has none "
                        "(use template='plain' or 'auto')")
    if template == "chat:system":
        return _render(tokenizer, [{"role": "system", "content": GENERIC_SYSTEM_PROMPT},
                                   {"role": "user", "content": question}])
    text = _render(tokenizer, [{"role": "user", "content": question}])
    if template == "chat:no-system":
        block = _system_block(tokenizer)
        if block is None:
            return text                    # no default system prompt: the plain chat rendering is without one
        start, end = block
        reference = _render(tokenizer, [{"role": "user", "content": _SENT_Q}])
        if text[:end] != reference[:end]:
            raise GRUNError("the chat template renders the system block differently per question; "
                            "template='chat:no-system' cannot remove it")
        text = text[:start] + text[end:]
    return text


def chat_has_default_system(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template adds a system prompt of its own to a lone user message."""
    return has_chat_template(tokenizer) and _system_block(tokenizer) is not None


# ----------------------------------------------------------------------------------------------- prompts
def format_prompt(question: str, tokenizer: Any = None, template: str = "auto") -> str:
    """Prompt text for a question in the given format (see the module docstring)."""
    template = resolve_template(template, tokenizer)
    if template == "plain":
        return PLAIN_TEMPLATE.format(question=question)
    if is_chat(template):
        return _chat_prompt(question, tokenizer, template)
    return template.format(question=question)


def format_variants(template: str, tokenizer: Any = None) -> dict[str, str]:
    """The prompt formats a deployment may send for an adapter trained on ``template``: ``{label: format}``,
    the resolved format itself first (label ``"as trained"``), each a format ``format_prompt`` accepts.

    plain / custom: the answer cue with no trailing whitespace, a trailing space, a trailing newline; the bare
    question. chat: the template with and without its default system prompt (a generic system prompt when
    it has none); the bare question.
    """
    fmt = resolve_template(template, tokenizer)
    out: dict[str, str] = {"as trained": fmt}
    if is_chat(fmt):
        if not has_chat_template(tokenizer):
            raise GRUNError(f"template={fmt!r} needs a tokenizer with a chat template; this tokenizer has none")
        candidates = [("chat", "chat")]
        if chat_has_default_system(tokenizer):
            candidates.append(("chat, no system prompt", "chat:no-system"))
        else:
            candidates.append(("chat, system prompt", "chat:system"))
    else:
        text = PLAIN_TEMPLATE if fmt == "plain" else fmt
        stem = text.rstrip()
        candidates = [("cue, no space", stem), ("cue + space", stem + " "), ("cue + newline", stem + "\n")]
        if fmt == "plain":
            candidates = [("cue, no space", "plain")] + candidates[1:]
    candidates.append(("bare question", "{question}"))
    seen = {fmt if fmt != "plain" else PLAIN_TEMPLATE}
    if fmt == "chat:no-system" or (fmt == "chat" and not chat_has_default_system(tokenizer)):
        seen.add("chat")
    for label, variant in candidates:
        key = PLAIN_TEMPLATE if variant == "plain" else variant
        if key in seen:
            continue
        seen.add(key)
        out[label] = variant
    return out


def row_prompt(row: Mapping[str, Any], tokenizer: Any = None, template: str = "auto",
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
    return not (is_chat(template) and "prompt" not in row)


def answer_separator(row: Mapping[str, Any], prompt: str, template: str) -> str:
    """Text between the prompt and the answer: nothing after a chat generation prompt, a document prefix or
    a prompt that already ends in whitespace; one space otherwise."""
    if "prompt" in row or is_chat(template) or not prompt or prompt[-1].isspace():
        return ""
    return " "


def _tokenize(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of many texts in one tokenizer call (a fast tokenizer encodes a list in parallel; per-text
    calls cost more than the encoding itself on short QA rows)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]


def _start_token(tokenizer: Any) -> int:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise GRUNError("the prompt is empty and the tokenizer has neither a BOS nor an EOS token to start it with")
    return int(start)


def _by_flag(tokenizer: Any, texts: Sequence[str], special: Sequence[bool]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in texts]
    for flag in (True, False):
        chosen = [i for i, s in enumerate(special) if s == flag]
        for i, ids in zip(chosen, _tokenize(tokenizer, [texts[i] for i in chosen], flag)):
            out[i] = ids
    return out


def prompt_ids_batch(tokenizer: Any, rows: Sequence[Mapping[str, Any]], template: str = "auto",
                     question_key: str = "question", encoding: str = "grun") -> list[list[int]]:
    """Token ids of each row's prompt, exactly as generation and teacher-forced scoring must see them.

    Never empty: an empty prompt (document mode) becomes the BOS token (EOS when there is no BOS), so the
    edit always has a position, ``len(ids) - 1``.
    """
    return encode_prompts_answers(tokenizer, rows, None, template, question_key, encoding)[0]


def check_encoding(encoding: Any) -> str:
    if encoding not in ENCODINGS:
        raise GRUNError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    return encoding


def encode_prompts_answers(tokenizer: Any, rows: Sequence[Mapping[str, Any]], answers: Sequence[str] | None,
                           template: str = "auto", question_key: str = "question", encoding: str = "grun"
                           ) -> tuple[list[list[int]], list[list[int]] | None]:
    """(prompt ids, answer ids or None) of each row, without EOS. ``encoding="grun"``: the answer's ids are
    exact continuations of the prompt's (see the module docstring); ``"open-unlearning"``: see ENCODINGS (the
    prompt ids returned with answers are then the joined text's first ``len(tokenize(prompt))`` ids)."""
    check_encoding(encoding)
    template = resolve_template(template, tokenizer)
    texts = [row_prompt(row, tokenizer, template, question_key) for row in rows]
    special = [_adds_special_tokens(row, template) for row in rows]
    seps = [answer_separator(row, text, template) for row, text in zip(rows, texts)]
    if encoding == "open-unlearning":
        texts, seps = [t + s for t, s in zip(texts, seps)], ["" for _ in seps]
    prompts = _by_flag(tokenizer, texts, special)
    empty = [i for i, ids in enumerate(prompts) if not ids]
    if empty:
        start = _start_token(tokenizer)
        for i in empty:
            prompts[i] = [start]
    if answers is None:
        return prompts, None
    joined = _by_flag(tokenizer, [t + s + a for t, s, a in zip(texts, seps, answers)], special)
    if encoding == "open-unlearning":
        full = [i not in empty and len(j) > len(p) for i, (p, j) in enumerate(zip(prompts, joined))]
        return ([j[:len(p)] if ok else p for ok, p, j in zip(full, prompts, joined)],
                [j[len(p):] if ok else _tokenize(tokenizer, [a], False)[0]
                 for ok, p, j, a in zip(full, prompts, joined, answers)])
    alone: dict[int, list[int]] = {}
    out: list[list[int]] = []
    misfits = [i for i, (p, j) in enumerate(zip(prompts, joined))
               if i in empty or len(j) <= len(p) or j[:len(p)] != p]
    for i, ids in zip(misfits, _tokenize(tokenizer, [seps[i] + answers[i] for i in misfits], False)):
        alone[i] = ids
    for i, (p, j) in enumerate(zip(prompts, joined)):
        out.append(alone[i] if i in alone else j[len(p):])
    return prompts, out


def prompt_ids(tokenizer: Any, row: Mapping[str, Any], template: str = "auto",
               question_key: str = "question") -> list[int]:
    """``prompt_ids_batch`` of one row."""
    return prompt_ids_batch(tokenizer, [row], template, question_key)[0]


def answer_ids_batch(tokenizer: Any, answers: Sequence[str], add_eos: bool = True) -> list[list[int]]:
    """Token ids of answer texts tokenised on their own (no BOS), with EOS appended. (Training and scoring
    tokenise the answer after its prompt: ``encode_prompts_answers``.)"""
    out = _tokenize(tokenizer, answers, add_special_tokens=False)
    if add_eos and tokenizer.eos_token_id is not None:
        for ids in out:
            ids.append(tokenizer.eos_token_id)
    return out


def answer_ids(tokenizer: Any, answer: str, add_eos: bool = True) -> list[int]:
    """``answer_ids_batch`` of one answer."""
    return answer_ids_batch(tokenizer, [answer], add_eos)[0]
