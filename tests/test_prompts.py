"""Prompt formats: auto/plain/chat/custom, validation, variants, and the exact prompt/answer token boundary."""
import pytest

from grun_fast import GRUNError
from grun_fast.data import encode_rows, make_authors
from grun_fast.data.collate import ForgetSchedule, PairedCollator, variant_index_for
from grun_fast.data.prompts import (PLAIN_TEMPLATE, check_template, encode_prompts_answers, format_prompt,
                                    format_variants, parse_template_arg, prompt_ids_batch, resolve_template)
from grun_fast.testing import make_tiny_tokenizer
from grun_fast.unlearn.config import UnlearnConfig

# SmolLM2's template: a default system prompt when the conversation has none
CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama-3 style, no default system prompt
HEADER_NO_SYSTEM = (
    "{{ bos_token }}{% for message in messages %}{{'<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def rows():
    return make_authors(3, 6, seed=1)


@pytest.fixture()
def bpe(rows):
    texts = [PLAIN_TEMPLATE.format(question=r["question"]) + " " + r["answer"] for r in rows]
    return make_tiny_tokenizer(texts, vocab_size=500)


@pytest.fixture(scope="module")
def spm(rows):
    """A SentencePiece-style tokenizer (Metaspace pre-tokenizer, BPE on '▁'-words, BOS added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    texts = [PLAIN_TEMPLATE.format(question=r["question"]) + " " + r["answer"] for r in rows]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


# ---------------------------------------------------------------- formats and validation
def test_plain_is_the_qa_fine_tuning_format(bpe):
    assert format_prompt("Who?") == "Question: Who?\nAnswer:"
    assert resolve_template("auto", bpe) == "plain" and resolve_template("auto") == "plain"
    bpe.chat_template = HEADER_NO_SYSTEM
    assert resolve_template("auto", bpe) == "chat"
    assert format_prompt("Who?", bpe) == format_prompt("Who?", bpe, "chat")
    assert UnlearnConfig().template == "auto"


def test_custom_format_strings_are_validated():
    assert check_template("Q: {question}\nA:") == "Q: {question}\nA:"
    assert format_prompt("Who?", None, "Q: {question}\nA:") == "Q: Who?\nA:"
    assert format_prompt("Who?", None, "{{literal}} {question}") == "{literal} Who?"
    for bad, message in [("Q: {q}\nA:", r"field \{q\}"), ("{question} {question}", "exactly one"),
                         ("Q: {question} {other}", r"field \{other\}"), ("no field", "exactly one"),
                         ("Q: {question!r}", "field"), ("Q: {question:>10}", "field"), ("Q: {", "not a valid format"),
                         ("", "non-empty"), ("qa", "unknown prompt template 'qa'")]:
        with pytest.raises(GRUNError, match=message):
            check_template(bad)
    with pytest.raises(GRUNError, match="exactly one"):
        UnlearnConfig(template="Q: A:")
    assert UnlearnConfig(template="Q: {question}\nA:").template == "Q: {question}\nA:"
    # the command line reads \n and \t escapes
    assert parse_template_arg("Q: {question}\\nA:") == "Q: {question}\nA:"
    assert parse_template_arg(None) is None
    with pytest.raises(GRUNError):
        parse_template_arg("Q:\\nA:")


def test_chat_needs_a_chat_template(bpe):
    with pytest.raises(GRUNError, match="chat template"):
        format_prompt("Who?", bpe, "chat")
    with pytest.raises(GRUNError, match="chat template"):
        format_variants("chat", bpe)


# ---------------------------------------------------------------- variants
def test_variants_of_plain_and_custom(bpe):
    v = format_variants("auto", bpe)
    assert list(v.values()) == ["plain", "Question: {question}\nAnswer: ", "Question: {question}\nAnswer:\n",
                                "{question}"]
    assert list(v)[0] == "as trained"
    texts = [format_prompt("Who?", bpe, f) for f in v.values()]
    assert texts == ["Question: Who?\nAnswer:", "Question: Who?\nAnswer: ", "Question: Who?\nAnswer:\n", "Who?"]
    c = format_variants("Q: {question}\nA: ", bpe)   # trained with a trailing space: that one first
    assert list(c.values()) == ["Q: {question}\nA: ", "Q: {question}\nA:", "Q: {question}\nA:\n", "{question}"]


def test_variants_of_chat_with_and_without_default_system(bpe):
    bpe.chat_template = CHATML_DEFAULT_SYSTEM
    v = format_variants("auto", bpe)
    assert list(v.values()) == ["chat", "chat:no-system", "{question}"]
    assert format_prompt("Who?", bpe, "chat").startswith("<|im_start|>system\nYou are a helpful AI")
    assert format_prompt("Who?", bpe, "chat:no-system") == "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
    bpe.chat_template = HEADER_NO_SYSTEM          # no default system prompt: a generic one is the variant
    v = format_variants("chat", bpe)
    assert list(v.values()) == ["chat", "chat:system", "{question}"]
    assert format_prompt("Who?", bpe, "chat:no-system") == format_prompt("Who?", bpe, "chat")
    assert "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>" in \
        format_prompt("Who?", bpe, "chat:system")


# ---------------------------------------------------------------- the token boundary
@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_answer_tokens_are_the_joined_texts_tail(which, rows, request):
    tok = request.getfixturevalue(which)
    for fmt in ("plain", "Q: {question}\nA:", "{question}"):
        examples = encode_rows(tok, rows, fmt, max_length=512)
        prompts = prompt_ids_batch(tok, rows, fmt)
        for r, e, p in zip(rows, examples, prompts):
            prompt = format_prompt(r["question"], tok, fmt)
            joined = tok(prompt + " " + r["answer"])["input_ids"]
            assert p == tok(prompt)["input_ids"] and e["prompt_len"] == len(p)
            assert e["input_ids"] == joined + [tok.eos_token_id]      # the joined text, exactly, + EOS
            assert tok.decode(e["input_ids"][:-1], skip_special_tokens=True) == prompt + " " + r["answer"]


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_trailing_whitespace_prompts_keep_their_own_tokens(which, rows, request):
    """A prompt ending in a space: generation sees tokenize(prompt), so training does too; the answer follows
    with no second space."""
    tok = request.getfixturevalue(which)
    fmt = "Question: {question}\nAnswer: "
    prompts, answers = encode_prompts_answers(tok, rows, [r["answer"] for r in rows], fmt)
    for r, p, a in zip(rows, prompts, answers):
        prompt = format_prompt(r["question"], tok, fmt)
        assert p == tok(prompt)["input_ids"]
        assert tok.decode(p + a, skip_special_tokens=True).replace("  ", " ").rstrip() in (
            prompt + r["answer"], (prompt + r["answer"]).replace("  ", " "))


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_open_unlearning_encoding_is_its_evaluators(which, rows, request):
    """``encoding="open-unlearning"``: the separator ends the prompt, prompt + answer are tokenised in one call
    and labelled from len(tokenize(prompt)), as its evaluator does; generation sees tokenize(prompt)."""
    tok = request.getfixturevalue(which)
    examples = encode_rows(tok, rows, "plain", encoding="open-unlearning")
    prompts = prompt_ids_batch(tok, rows, "plain", encoding="open-unlearning")
    ours = encode_rows(tok, rows, "plain")
    differ = 0
    for r, e, p, o in zip(rows, examples, prompts, ours):
        prompt = PLAIN_TEMPLATE.format(question=r["question"]) + " "
        assert p == tok(prompt)["input_ids"]
        assert e["input_ids"] == tok(prompt + r["answer"])["input_ids"] + [tok.eos_token_id]
        assert e["prompt_len"] == len(tok(prompt)["input_ids"])
        differ += e["input_ids"] != o["input_ids"] or e["prompt_len"] != o["prompt_len"]
    assert differ > 0   # the trailing space merges with the first answer word: the labels really differ
    with pytest.raises(GRUNError, match="unknown encoding"):
        encode_rows(tok, rows, "plain", encoding="openunlearning")


def test_chat_answer_follows_the_generation_prompt(bpe, rows):
    bpe.chat_template = CHATML_DEFAULT_SYSTEM
    e = encode_rows(bpe, rows[:3], "auto")
    for r, x in zip(rows, e):
        prompt = format_prompt(r["question"], bpe, "chat")
        assert x["input_ids"][:-1] == bpe(prompt + r["answer"], add_special_tokens=False)["input_ids"]
        assert x["input_ids"][:x["prompt_len"]] == bpe(prompt, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- augmentation draws
def test_variant_draws_are_functions_of_seed_and_position(bpe, rows):
    variants = [encode_rows(bpe, rows[:6], f) for f in format_variants("plain", bpe).values()]
    retain = [encode_rows(bpe, rows[6:], f) for f in format_variants("plain", bpe).values()]
    sched = ForgetSchedule(variants[0], epochs=8, seed=3, variants=variants[1:])
    again = ForgetSchedule(variants[0], epochs=8, seed=3, variants=variants[1:])
    items = [sched[k] for k in range(48)]
    assert [it["forget_index"] for it in items] == [again[k]["forget_index"] for k in range(48)]
    shown = {it["forget_index"] // 6 for it in items}
    assert shown == {0, 1, 2, 3}                                  # every variant is drawn
    for k, it in enumerate(items):
        v, i = divmod(it["forget_index"], 6)
        assert v == variant_index_for(k, 4, 3, "forget") and it["forget"] is variants[v][i]
        assert sched.all_examples[it["forget_index"]] is it["forget"]
    coll = PairedCollator(retain[0], bpe.pad_token_id, seed=3, variants=retain[1:])
    whole = coll(items)
    halves = [coll(items[:20]), coll(items[20:])]
    import torch
    assert torch.equal(whole["retain_index"], torch.cat([h["retain_index"] for h in halves]))
    assert len({int(j) // len(retain[0]) for j in whole["retain_index"]}) > 1
    # one variant: identical to the unaugmented schedule (nothing extra drawn)
    plain = ForgetSchedule(variants[0], epochs=8, seed=3)
    assert [plain[k]["forget_index"] for k in range(48)] == [int(sched.order[k]) for k in range(48)]
    with pytest.raises(ValueError, match="one example per forget row"):
        ForgetSchedule(variants[0], variants=[variants[1][:2]])
