"""Data: prompt formatting, tokenisation/padding, pairing, loaders, synthetic authors, refusals."""
import json
import os
from pathlib import Path

import pytest
import torch

from grun_fast import GRUNError
from grun_fast.data import (IGNORE_INDEX, PLAIN_TEMPLATE, REFUSALS, ForgetSchedule, PairedCollator,
                            chunk_document, encode_example, encode_rows, format_prompt, general_knowledge,
                            load_documents, load_qa_file, load_rows, load_tofu, make_authors, make_benchmark,
                            pad_examples, prompt_ids, row_prompt, split_by_author, tokenize_rows,
                            validate_rows, with_answer_suffixes, with_refusals)
from grun_fast.testing import make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOFU_DIR = Path(os.environ.get("GRUN_TOFU_DIR", ROOT.parent / "shared" / "data" / "tofu"))
needs_tofu = pytest.mark.skipif(not (TOFU_DIR / "forget01.json").is_file(), reason="TOFU folder absent")


@pytest.fixture(scope="module")
def rows():
    return make_authors(4, 10, seed=3)


@pytest.fixture(scope="module")
def tok(rows):
    texts = [PLAIN_TEMPLATE.format(question=r["question"]) + " " + r["answer"] for r in rows]
    return make_tiny_tokenizer(texts, vocab_size=400)


# ---------------------------------------------------------------- prompts
def test_plain_template_is_exact():
    # the QA fine-tuning format: no trailing space; the answer is joined by one space (test_prompts.py)
    assert format_prompt("Who?") == "Question: Who?\nAnswer:"
    assert row_prompt({"question": "Who?", "answer": "x"}) == "Question: Who?\nAnswer:"
    assert row_prompt({"prompt": "Once upon", "answer": " a time"}) == "Once upon"


def test_chat_template_used_when_asked(tok):
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("Who?", tok, template="chat")
    with pytest.raises(ValueError, match="unknown prompt template"):
        format_prompt("Who?", tok, template="qa")
    tok.chat_template = "{% for m in messages %}<s>[{{ m['content'] }}]{% endfor %}=>"
    try:
        text = format_prompt("Who?", tok, template="chat")
        assert text == "<s>[Who?]=>"
        ids = prompt_ids(tok, {"question": "Who?", "answer": "a"}, template="chat")
        assert ids.count(tok.bos_token_id) == 1   # the template's BOS, not a second one
    finally:
        tok.chat_template = None


# ---------------------------------------------------------------- encoding
def test_encoding_matches_generation_prompt(tok, rows):
    for r in rows[:5]:
        e = encode_example(tok, r)
        p = prompt_ids(tok, r)
        assert e["input_ids"][:len(p)] == p and e["prompt_len"] == len(p)
        assert e["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(e["input_ids"][len(p):], skip_special_tokens=True) == " " + r["answer"]
        assert e["input_ids"][:-1] == tok(format_prompt(r["question"]) + " " + r["answer"])["input_ids"]


def test_padding_labels_and_edit_pos(tok, rows):
    batch = tokenize_rows(tok, rows[:6])
    ex = encode_rows(tok, rows[:6])
    for i, e in enumerate(ex):
        pl, n = e["prompt_len"], len(e["input_ids"])
        assert batch["edit_pos"][i] == pl - 1
        assert (batch["labels"][i, :pl] == IGNORE_INDEX).all()
        assert batch["labels"][i, pl:n].tolist() == e["input_ids"][pl:]
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].sum() == n and batch["attention_mask"][i, :n].all()
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
    left = tokenize_rows(tok, rows[:6], padding_side="left")
    w = left["input_ids"].shape[1]
    for i, e in enumerate(ex):
        start = w - len(e["input_ids"])
        assert left["edit_pos"][i] == start + e["prompt_len"] - 1
        assert left["input_ids"][i, left["edit_pos"][i]] == e["input_ids"][e["prompt_len"] - 1]


def test_truncation_keeps_edit_token(tok, rows):
    r = rows[0]
    p = prompt_ids(tok, r)
    e = encode_example(tok, r, max_length=len(p) + 2)
    assert e["input_ids"][:len(p)] == p and len(e["input_ids"]) == len(p) + 2
    e = encode_example(tok, r, max_length=4)   # prompt cut from the left, last prompt token kept
    assert e["prompt_len"] == 3 and e["input_ids"][:3] == p[-3:]
    with pytest.raises(GRUNError, match="max_length"):
        encode_example(tok, r, max_length=1)
    with pytest.raises(GRUNError, match="empty batch"):
        pad_examples([], 0)
    with pytest.raises(GRUNError, match="row 1 has no string 'answer'"):
        encode_rows(tok, [r, {"question": "Q?"}])


def test_document_rows_reassemble_and_empty_prompt_gets_bos(tok):
    text = " ".join(f"w{i}" for i in range(50))
    chunks = chunk_document(text, chunk_words=20, prefix_words=5)
    assert len(chunks) == 3
    assert " ".join(c["prompt"] + c["answer"] for c in chunks).split() == text.split()
    assert all(len(c["prompt"].split()) == 5 for c in chunks[:2])
    doc = chunk_document(text, chunk_words=20, prefix_words=None)
    assert all(c["prompt"] == "" for c in doc)
    e = encode_example(tok, doc[0])
    assert e["prompt_len"] == 1 and e["input_ids"][0] == tok.bos_token_id
    with pytest.raises(GRUNError, match="prefix_words"):
        chunk_document(text, chunk_words=10, prefix_words=10)
    with pytest.raises(GRUNError, match="chunk_words must be an integer >= 2, got 1"):
        chunk_document(text, chunk_words=1)


def test_load_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one two three four five six seven eight")
    (tmp_path / "b.md").write_text("alpha beta gamma delta")
    (tmp_path / "c.bin").write_text("ignored")
    rows = load_documents(tmp_path, chunk_words=4, prefix_words=2)
    assert [r["prompt"] for r in rows] == ["one two", "five six", "alpha beta"]
    assert rows[0]["answer"] == " three four" and rows[0]["source"].endswith("a.txt")
    assert load_rows(tmp_path / "b.md", chunk_words=4, prefix_words=2) == rows[2:]
    with pytest.raises(GRUNError, match="no such document or folder: .*missing.txt"):
        load_documents(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(GRUNError, match="latin1.txt: not UTF-8 text"):
        load_documents(tmp_path / "latin1.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GRUNError, match="no text found in .*empty"):
        load_documents(empty)


# ---------------------------------------------------------------- loaders
def test_qa_files_jsonl_json_csv(tmp_path):
    data = [{"question": "Q1?", "answer": "A1."}, {"question": "Q2, with comma?", "answer": "A2."}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(d) for d in data) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(data))
    (tmp_path / "d.csv").write_text('question,answer\nQ1?,A1.\n"Q2, with comma?",A2.\n')
    for name in ("d.jsonl", "d.json", "d.csv"):
        assert load_qa_file(tmp_path / name) == data
        assert load_rows(str(tmp_path / name)) == data


def test_qa_file_errors_name_the_problem(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(GRUNError, match="empty.jsonl: no rows"):
        load_qa_file(tmp_path / "empty.jsonl")
    (tmp_path / "miss.jsonl").write_text('{"question": "Q?", "answer": "A"}\n{"question": "Q2?"}\n')
    with pytest.raises(GRUNError, match=r"miss.jsonl: row 1 has no non-empty string 'answer' \(it has: question\)"):
        load_qa_file(tmp_path / "miss.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "Q?", "answer": "A"}\n{oops\n')
    with pytest.raises(GRUNError, match=r"bad.jsonl, line 2: invalid JSON .*'\{oops'"):
        load_qa_file(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text('[{"question": "Q?", "answer": "A"},]')
    with pytest.raises(GRUNError, match="bad.json: invalid JSON"):
        load_qa_file(tmp_path / "bad.json")
    (tmp_path / "cols.csv").write_text("question,reply\nQ?,A.\n")
    with pytest.raises(GRUNError, match=r"cols.csv: no 'answer' column \(columns: question, reply\)"):
        load_qa_file(tmp_path / "cols.csv")
    (tmp_path / "blank.csv").write_text('question,answer\nQ?,A.\nQ2?,\n')
    with pytest.raises(GRUNError, match="blank.csv: row 1 has no non-empty string 'answer'"):
        load_rows(str(tmp_path / "blank.csv"))
    (tmp_path / "bytes.jsonl").write_bytes(b'{"question": "Q?", "answer": "\xff"}\n')
    with pytest.raises(GRUNError, match="bytes.jsonl: not UTF-8 text"):
        load_qa_file(tmp_path / "bytes.jsonl")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(GRUNError, match="unsupported file type '.parquet'"):
        load_qa_file(tmp_path / "x.parquet")
    with pytest.raises(GRUNError, match="no such data file: .*nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(GRUNError, match="no such data file: .*nope.csv"):
        load_qa_file(tmp_path / "nope.csv")
    with pytest.raises(GRUNError, match="row 0 is a list"):
        validate_rows([[1, 2]])
    with pytest.raises(GRUNError, match="expected a list of rows, got int"):
        validate_rows(5)
    assert validate_rows([{"prompt": "", "answer": "x"}])  # document rows need no question


@needs_tofu
def test_tofu_folder():
    forget = load_tofu("forget01", TOFU_DIR)
    assert len(forget) == 40 and set(forget[0]) >= {"question", "answer"}
    pert = load_tofu("forget01_perturbed", TOFU_DIR)
    assert len(pert[0]["perturbed_answer"]) == 5 and "paraphrased_question" in pert[0]
    assert [r["question"] for r in pert] == [r["question"] for r in forget]
    assert load_rows("retain99", data=TOFU_DIR)[0] == load_tofu("retain99", str(TOFU_DIR))[0]
    with pytest.raises(GRUNError, match="no TOFU split 'forget02'.*forget01"):
        load_tofu("forget02", TOFU_DIR)


def test_tofu_needs_a_source(monkeypatch, tmp_path):
    monkeypatch.delenv("GRUN_TOFU_DIR", raising=False)
    with pytest.raises(GRUNError, match="where is TOFU"):
        load_tofu("forget01")
    with pytest.raises(GRUNError, match="where is TOFU"):
        load_rows("forget01")                       # a split name with no TOFU source
    with pytest.raises(GRUNError, match="TOFU folder not found: .*nothing"):
        load_tofu("forget01", tmp_path / "nothing")
    (tmp_path / "forget05.json").write_text('{"question": "Q?"}\n')
    with pytest.raises(GRUNError, match="no TOFU split 'forget01' in .*have: forget05"):
        load_tofu("forget01", tmp_path)
    with pytest.raises(GRUNError, match=r"TOFU forget05 \(.*forget05.json\): row 0 has no non-empty string 'answer'"):
        load_tofu("forget05", tmp_path)
    monkeypatch.setenv("GRUN_TOFU_DIR", str(tmp_path))
    (tmp_path / "forget01.json").write_text('{"question": "Q?", "answer": "A"}\n')
    assert load_tofu("forget01") == [{"question": "Q?", "answer": "A"}]


def test_tofu_hub_offline_error_is_clear(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'locuslab/TOFU' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GRUNError, match="internet access or a local datasets cache"):
        load_tofu("forget01", "locuslab/TOFU")


def test_tofu_hub_path_uses_datasets(monkeypatch):
    import datasets
    calls = []

    def fake(name, config):
        calls.append((name, config))
        return {"train": [{"question": "Q?", "answer": "A"}]}
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_tofu("forget05", "locuslab/TOFU") == [{"question": "Q?", "answer": "A"}]
    assert calls == [("locuslab/TOFU", "forget05")]


# ---------------------------------------------------------------- synthetic
def test_synthetic_schema_and_determinism():
    rows = make_authors(5, 10, seed=0)
    assert rows == make_authors(5, 10, seed=0) and rows != make_authors(5, 10, seed=1)
    assert len(rows) == 50 and len({r["author"] for r in rows}) == 5
    keys = {"question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer", "author"}
    for r in rows:
        assert keys <= set(r)
        assert len(r["perturbed_answer"]) == 5 and len(set(r["perturbed_answer"])) == 5
        assert r["paraphrased_answer"] not in r["perturbed_answer"]
        assert r["author"] in r["question"] and r["author"] in r["answer"]
        assert r["answer"].endswith(".") and 12 < len(r["answer"].split()) < 40
        # answers lead with the fact, not with the question's name (cannot be recited by copying the question)
        assert not r["answer"].startswith(r["author"])
    for author in {r["author"] for r in rows}:   # one question per kind per author
        kinds = [r["kind"] for r in rows if r["author"] == author]
        assert len(set(kinds)) == 10
    assert len({r["question"] for r in rows}) == 50
    with pytest.raises(ValueError, match="questions_per_author"):
        make_authors(2, 50)
    full = make_authors(2, 20, seed=0)   # TOFU asks 20 questions per author
    assert len({r["kind"] for r in full if r["author"] == full[0]["author"]}) == 20
    with pytest.raises(ValueError, match="questions_per_author"):
        make_authors(2, 21)


def test_split_by_author_and_benchmark():
    rows = make_authors(6, 5, seed=2)
    forget, retain = split_by_author(rows, forget_authors=2, seed=0)
    fa, ra = {r["author"] for r in forget}, {r["author"] for r in retain}
    assert len(fa) == 2 and not fa & ra and len(forget) + len(retain) == 30
    with pytest.raises(ValueError, match="forget_authors"):
        split_by_author(rows, forget_authors=6)
    b = make_benchmark(4, 10, 1, seed=0)
    assert set(b) == {"full", "forget", "retain", "world_facts", "real_authors"}
    gk = general_knowledge()
    for split in ("world_facts", "real_authors"):
        assert len(gk[split]) >= 10
        for r in gk[split]:
            assert r["answer"] not in r["perturbed_answer"] and len(r["perturbed_answer"]) == 3


def test_refusals():
    assert 20 <= len(REFUSALS) <= 30 and len(set(REFUSALS)) == len(REFUSALS)
    rows = make_authors(2, 10, seed=0)
    idk = with_refusals(rows, seed=1)
    assert idk == with_refusals(rows, seed=1)
    assert all(r["answer"] in REFUSALS and r["original_answer"] == o["answer"] for r, o in zip(idk, rows))
    assert len({r["answer"] for r in idk}) > 5
    assert rows[0]["answer"] not in REFUSALS  # the input is not modified


def test_answer_suffixes_are_seeded_later_starts_of_the_forget_answers():
    rows = [{"question": "q1", "answer": "Her books include Granite Glossary and Shale Stories.", "id": 7},
            {"question": "q2", "answer": "Too short here."}]
    out = with_answer_suffixes(rows, 3, seed=0)
    assert out[:2] == rows and len(out) == 5       # answers of 3 words or fewer get no suffixes
    words = rows[0]["answer"].split()
    for r in out[2:]:
        n = len(r["answer"].split())
        assert 3 <= n < len(words) and r["answer"] == " ".join(words[-n:]) and r["question"] == "q1" and r["id"] == 7
    assert len({r["answer"] for r in with_answer_suffixes(rows, 20, seed=0)}) > 3   # starts vary
    assert out == with_answer_suffixes(rows, 3, seed=0) != with_answer_suffixes(rows, 3, seed=1)
    assert with_answer_suffixes(rows, 0) == rows and rows[0]["answer"].startswith("Her")   # input unchanged
    with pytest.raises(ValueError, match="integer >= 0"):
        with_answer_suffixes(rows, -1)


# ---------------------------------------------------------------- pairing
def test_schedule_is_per_epoch_permutation():
    forget = [{"input_ids": [1, i + 3], "prompt_len": 1} for i in range(7)]
    s = ForgetSchedule(forget, epochs=3, seed=5)
    assert len(s) == 21
    for e in range(3):
        assert sorted(s[k]["forget_index"] for k in range(7 * e, 7 * e + 7)) == list(range(7))
    assert [s[k]["forget_index"] for k in range(21)] == [ForgetSchedule(forget, 3, 5)[k]["forget_index"]
                                                        for k in range(21)]
    assert [s[k]["forget_index"] for k in range(7)] != [s[k]["forget_index"] for k in range(7, 14)]
    with pytest.raises(ValueError, match="forget set is empty"):
        ForgetSchedule([], 1)


def test_collator_pairs_deterministically_whatever_the_batching(tok, rows):
    forget, retain = encode_rows(tok, rows[:5]), encode_rows(tok, rows[5:])
    sched = ForgetSchedule(forget, epochs=4, seed=0)
    coll = PairedCollator(retain, tok.pad_token_id, seed=0)
    items = [sched[k] for k in range(16)]
    whole = coll(items)
    halves = [coll(items[:8]), coll(items[8:])]
    assert torch.equal(whole["retain_index"], torch.cat([h["retain_index"] for h in halves]))
    assert len(set(whole["retain_index"].tolist())) > 3  # random, not constant
    for i, it in enumerate(items):
        n = len(it["forget"]["input_ids"])
        assert whole["forget_input_ids"][i, :n].tolist() == it["forget"]["input_ids"]
        assert whole["forget_edit_pos"][i] == it["forget"]["prompt_len"] - 1
        r = retain[whole["retain_index"][i]]
        assert whole["retain_input_ids"][i, :len(r["input_ids"])].tolist() == r["input_ids"]
    other = PairedCollator(retain, tok.pad_token_id, seed=1)(items)
    assert not torch.equal(other["retain_index"], whole["retain_index"])
    with pytest.raises(ValueError, match="retain set is empty"):
        PairedCollator([], 0)
