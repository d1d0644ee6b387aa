"""The real-model demo's pieces that need no model: question sets, report, checks, command-line errors.
(The run on SmolLM2 itself is in tests/test_real_model.py, slow group.)"""
from __future__ import annotations

import argparse
import json

import pytest

from grun_fast import cli, demo, demo_real
from grun_fast.data import real_topics
from grun_fast.errors import GRUNError


def test_question_sets_are_distinct_and_sized():
    assert len(real_topics.TOPIC) == len(real_topics.REWORDED) == 20
    assert len(real_topics.GENERAL) == 60 and real_topics.RETAIN_COUNT == 40
    topic = [t["question"] for t in real_topics.TOPIC]
    everything = topic + list(real_topics.REWORDED) + list(real_topics.GENERAL)
    assert len(set(q.lower() for q in everything)) == len(everything)
    assert all("potter" in q.lower() or "hogwarts" in q.lower() or "dumbledore" in q.lower() or "snape" in q.lower()
               or "hermione" in q.lower() or "hagrid" in q.lower() or "voldemort" in q.lower() or "muggle" in q.lower()
               for q in topic + list(real_topics.REWORDED))
    general = " ".join(real_topics.GENERAL).lower()
    assert not any(w in general for w in ("potter", "hogwarts", "voldemort", "rowling", "muggle"))


def test_build_rows_plan_sizes():
    rows = demo_real.build_rows(demo_real.RealPlan())
    assert [len(rows[k]) for k in ("forget", "reworded", "retain", "general")] == [20, 20, 40, 20]
    assert rows["reworded"][0]["key"] == rows["forget"][0]["key"] == "Rowling"
    quick = demo_real.build_rows(demo_real.REAL_QUICK)
    assert [len(quick[k]) for k in ("forget", "reworded", "retain", "general")] == [10, 10, 24, 8]
    assert not {r["question"] for r in rows["retain"]} & {r["question"] for r in rows["general"]}
    for bad in ({"forget": 0}, {"forget": 21}, {"retain": 41}, {"general": 21}):
        with pytest.raises(GRUNError):
            demo_real.build_rows(demo_real.RealPlan(**bad))


@pytest.mark.parametrize("text,expected", [
    ("I don't know.", True), ("I'm not able to provide that information.", True), ("I\u2019m not sure.", True),
    ("I'm sorry for any confusion, but I can't help.", True),
    ("The capital of France is Paris.", False), ("That's a very good question.", False),
    ("The books are by J.K. Rowling. I don't know more.", False),   # only the first sentence counts
])
def test_is_refusal(text, expected):
    assert demo_real.is_refusal(text) is expected


def _rows(forget_after: str, retain_after: str, gate_f: float, gate_r: float) -> dict:
    rows = demo_real.build_rows(demo_real.REAL_QUICK)
    for name in ("forget", "reworded"):
        for r in rows[name]:
            r.update(before="The books are by J.K. Rowling, who wrote them.", after=forget_after, gate=gate_f)
    for name in ("retain", "general"):
        for r in rows[name]:
            r.update(before="The capital of France is Paris.", after=retain_after, gate=gate_r)
    return rows


def _variants(gate_f: float, gate_r: float, worst_f: float | None = None) -> dict:
    """format_gates' shape: the trained format and two variants, the second with ``worst_f`` on forget."""
    def gates(f):
        return {"forget": f, "reworded": f, "retain": gate_r, "general": gate_r}
    return {"format": "Q: {question}\nA:", "variants": {
        "as trained": {"format": "Q: {question}\nA:", "gates": gates(gate_f)},
        "bare question": {"format": "{question}", "gates": gates(gate_f if worst_f is None else worst_f)}}}


def _args(**kw):
    return argparse.Namespace(model="smollm2", quick=True, **kw)


def test_report_passes_and_fails_where_it_should(tmp_path):
    times = {"total": 1.0}
    good = demo_real.build_real_report(_rows("I don't know.", "The capital of France is Paris.", 0.99, 0.01),
                                       _args(), demo_real.REAL_QUICK, [18, 23, 29], times, _variants(0.99, 0.01))
    assert all(good["checks"].values())
    t = good["table"]
    assert t["forget"]["rouge_l"] == 0.0 and t["retain"]["rouge_l"] == 1.0
    assert t["forget"]["refusals"] == 10 and t["retain"]["unchanged"] == 24
    assert t["forget"]["fact_stated_before"] == 2 and t["forget"]["fact_stated_after"] == 0  # the two Rowling rows

    leaky = demo_real.build_real_report(
        _rows("The books are by J.K. Rowling.", "Paris is nice.", 0.5, 0.2), _args(), demo_real.REAL_QUICK,
        [18], times, _variants(0.5, 0.2))
    failed = {name for name, ok in leaky["checks"].items() if not ok}
    assert len(failed) == 9, failed
    # One variant where the forget gate falls to 0.79 misses only that check.
    drifted = demo_real.build_real_report(
        _rows("I don't know.", "The capital of France is Paris.", 0.99, 0.01), _args(), demo_real.REAL_QUICK,
        [18, 23, 29], times, _variants(0.99, 0.01, worst_f=0.79))
    assert [name for name, ok in drifted["checks"].items() if not ok] == [
        "forget gate >= 0.8 under every prompt format"]
    assert leaky["table"]["forget"]["fact_stated_after"] == 2

    paths = demo_real.write_real_report(good, tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["checks"] == good["checks"] and data["rows"]["forget"][0]["after"] == "I don't know."
    md = (tmp_path / "report.md").read_text()
    assert "PASS  forget ROUGE-L <= 0.3" in md and "| forget (topic) | 10 | 0.000 | - |" in md
    assert "| bare question | `'{question}'` | 0.990 | 0.990 | 0.010 | 0.010 |" in md
    assert (tmp_path / "report.png").stat().st_size > 1000
    text = demo_real.render_real_table(good)
    assert "never-seen general" in text and "MISS" not in text


def _parse(argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("argv,message", [
    (["--steps", "5"], "only apply to the real-model demo"),
    (["--layers", "1,2"], "only apply to the real-model demo"),
    (["--model", "smollm2", "--data", "x"], "do not go together"),
    (["--model", "smollm2", "--layers", "a,b"], "comma-separated integers"),
    (["--model", "smollm2", "--steps", "0"], "--steps must be >= 1"),
    (["--model", "smollm2", "--lr", "-1"], "--lr > 0"),
])
def test_bad_options_are_grun_errors(argv, message, tmp_path):
    args = _parse(argv + ["--out", str(tmp_path)])
    with pytest.raises(GRUNError, match=message):
        demo.run(args)


def test_cli_demo_has_the_model_options():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--model", "smollm2", "--steps", "7", "--lr", "0.01", "--layers", "3,4", "--quick"])
    assert (args.model, args.steps, args.lr, args.layers, args.method) == ("smollm2", 7, 0.01, "3,4", None)
    assert "demo" in cli.SUBCOMMANDS
