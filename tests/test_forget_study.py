"""The forget-quality study's bookkeeping: its CSV grows columns without losing rows, medians per setting,
and the weakest of model utility's nine numbers is named."""
from __future__ import annotations

import csv

import pytest

from bench import forget_report as fr
from bench import forget_settings as fset
from bench import forget_study as fs
from grun_fast.errors import GRUNError


def _row(setting: str, seed: int, fq: float) -> dict:
    return {**{k: "" for k in fr.FIELDS}, "split": "forget01", "setting": setting, "seed": seed,
            "forget_quality": fq, "model_utility": 0.9}


def test_append_rewrites_an_older_header_and_keeps_its_rows(tmp_path):
    path = tmp_path / "study.csv"
    old_fields = fr.FIELDS[:-1]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields)
        writer.writeheader()
        writer.writerow({k: v for k, v in _row("npo", 0, 0.5).items() if k in old_fields})
    fr.append({**_row("npo", 1, 0.1), "utility_weakest": "retain/probability=0.400"}, path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == fr.FIELDS
        rows = list(reader)
    assert [r["seed"] for r in rows] == ["0", "1"]
    assert rows[0]["utility_weakest"] == "" and rows[1]["utility_weakest"] == "retain/probability=0.400"


def test_medians_over_seeds_take_the_latest_row_per_seed(tmp_path):
    path = tmp_path / "study.csv"
    for row in (_row("npo", 0, 0.9), _row("npo", 0, 0.1), _row("npo", 1, 0.3), _row("npo", 2, 0.5),
                _row("gd", 0, 1e-6)):
        fr.append(row, path)
    by_setting = {m["setting"]: m for m in fr.medians(path)}
    assert by_setting["npo"]["seeds"] == 3
    assert by_setting["npo"]["forget_quality"] == pytest.approx(0.3)   # seeds 0 (latest: 0.1), 1, 2
    assert by_setting["gd"]["seeds"] == 1


def test_log_truth_ratio_spread_is_the_median_and_sd_of_the_log_ratios():
    rows = [{"truth_ratio": t} for t in (0.5, 1.0, 2.0, 8.0)]
    median, sd = fs.log_truth_ratio_spread({"rows": rows})
    logs = [-0.6931471805599453, 0.0, 0.6931471805599453, 2.0794415416798357]
    mean = sum(logs) / 4
    assert median == pytest.approx((logs[1] + logs[2]) / 2)
    assert sd == pytest.approx((sum((x - mean) ** 2 for x in logs) / 4) ** 0.5)
    assert fs.log_truth_ratio_spread({"rows": []}) == (None, None)
    forget = {"rouge_l": 0.1, "truth_ratio": 0.6, "paraphrased_question": {"rouge_l": 0.1}, "rows": rows, "gate": {}}
    ev = {"splits": {"forget": forget, "retain": {"rouge_l": 0.9, "gate": {}}}}
    assert fs.summary(ev)["forget_log_truth_ratio_sd"] == pytest.approx(sd)


def test_weakest_utility_number_is_named():
    splits = {s: {"probability": 0.8, "rouge_l": 0.9, "truth_ratio": 0.7} for s in ("retain", "real_authors",
                                                                                    "world_facts")}
    splits["world_facts"]["probability"] = 0.25
    assert fs._weakest({"splits": splits}) == "world_facts/probability=0.250"
    assert fs._weakest({"splits": {}}) is None
    parts = fs.utility_parts({"splits": splits}).split()
    assert len(parts) == 9 and "world_facts/probability=0.250" in parts and "retain/truth_ratio=0.700" in parts


def test_unseen_retain_rows_are_never_evaluation_or_training_rows(tmp_path):
    import json
    from types import SimpleNamespace

    def write(split, questions):
        (tmp_path / f"{split}.json").write_text(
            "".join(json.dumps({"question": q, "answer": "a"}) + "\n" for q in questions))
    write("retain90", [f"q{i}" for i in range(10)])
    write("retain_perturbed", ["q0", "q1"])            # the retain evaluation's pool
    eval_splits = {"forget": [{"question": "q2"}], "world_facts": [{"question": "q3"}]}
    pipe = {"data": str(tmp_path), "plan": SimpleNamespace(seed=0), "rows": {"eval_splits": eval_splits}}
    rows = fs.unseen_retain_rows(pipe, 4)
    assert len(rows) == 4 and len({r["question"] for r in rows}) == 4
    assert not {r["question"] for r in rows} & {"q0", "q1", "q2", "q3"}
    assert rows == fs.unseen_retain_rows(pipe, 4)       # seeded
    assert len(fs.unseen_retain_rows(pipe, 100)) == 6   # as many as there are
    assert fs.unseen_retain_rows(pipe, 0) == []


def test_cached_model_creates_a_missing_cache_folder_and_reuses_it(tmp_path):
    """A fresh machine has no ~/.cache/grun_fast: the study (which, unlike the demo, reaches cached_model
    directly) once failed there after training the base model."""
    from grun_fast.demo import Plan, cached_model

    rows = [{"question": f"Who is author {i}?", "answer": f"Author {i} writes books."} for i in range(4)]
    plan = Plan(hidden_size=32, num_layers=2, base_epochs=1)
    cache = tmp_path / "fresh" / "cache"
    model, tok = cached_model(cache, "base", rows, plan)
    saved = [p for p in cache.iterdir() if p.name.startswith("demo-base-")]
    assert len(saved) == 1 and (saved[0] / "config.json").exists()
    again, _ = cached_model(cache, "base", rows, plan)     # from the cache: the same weights
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_study_refuses_an_unwritable_cache_before_any_work(tmp_path):
    from grun_fast.errors import GRUNError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    (tmp_path / "forget01.json").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(GRUNError, match="cannot write"):
        fs.main(["--data", str(tmp_path), "--split", "forget01", "--cache", str(blocker / "cache"),
                 "--settings", "default", "--csv", str(tmp_path / "out.csv")])
    assert not (tmp_path / "out.csv").exists()


def test_study_names_a_missing_data_folder_before_making_its_cache(tmp_path):
    with pytest.raises(GRUNError, match="TOFU folder not found.*no-data"):
        fs.main(["--data", str(tmp_path / "no-data"), "--settings", "default", "--cache", str(tmp_path / "c"),
                 "--csv", str(tmp_path / "out.csv")])
    assert not (tmp_path / "c").exists() and not (tmp_path / "out.csv").exists()


def test_study_refuses_a_paired_threshold_outside_0_1_before_any_work(tmp_path):
    (tmp_path / "forget01.json").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(GRUNError, match="gate_threshold must be a number in \\[0, 1\\], got 1.5"):
        fs.main(["--data", str(tmp_path), "--split", "forget01", "--settings", "default",
                 "--also-threshold", "0.5", "1.5", "--cache", str(tmp_path / "c"), "--csv", str(tmp_path / "out.csv")])
    assert not (tmp_path / "c").exists() and not (tmp_path / "out.csv").exists()


def test_negative_rows_are_seeded_and_never_evaluation_rows(tmp_path):
    import json

    def write(split, rows):
        (tmp_path / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for split in ("world_facts", "real_authors"):
        write(split, [{"question": f"{split} q{i}", "answer": "a"} for i in range(5)])
    eval_splits = {"forget": [{"question": "fq", "answer": "fa"}],
                   "world_facts": [{"question": "world_facts q0", "answer": "a"}]}
    rows = {"forget": eval_splits["forget"], "retain": [{"question": "rq one", "answer": "ra two"}],
            "eval_splits": eval_splits}
    pipe = {"data": str(tmp_path), "rows": rows,
            "tokenizer": type("T", (), {"__len__": lambda self: 50, "decode": lambda self, ids, **k: str(ids)})()}
    general = fs.negative_rows(pipe, "general:100", seed=0)
    assert len(general) == 9 and "world_facts q0" not in {r["question"] for r in general}  # 10 minus the held one
    shuffled = fs.negative_rows(pipe, "shuffled:3", seed=0)
    words = {"fq", "fa", "rq", "one", "ra", "two"}
    assert len(shuffled) == 3 and all(set(r["question"][:-1].split()) <= words for r in shuffled)
    assert shuffled == fs.negative_rows(pipe, "shuffled:3", seed=0) != fs.negative_rows(pipe, "shuffled:3", seed=1)
    assert len(fs.negative_rows(pipe, "noise:4", seed=0)) == 4
    with pytest.raises(ValueError, match="unknown negatives"):
        fs.negative_rows(pipe, "wikitext:3", seed=0)


def test_every_setting_builds_an_unlearn_config_and_a_typo_fails_before_any_work(monkeypatch, tmp_path):
    for name in fset.SETTINGS:
        own, overrides = fset.split_setting(name)
        assert set(own) <= set(fset.STUDY_KEYS) and not set(overrides) & set(fset.STUDY_KEYS)
    monkeypatch.setitem(fset.SETTINGS, "typo", {"method": "npo", "rnak": 64})
    with pytest.raises(GRUNError, match="'typo'.*rnak"):
        fs.main(["--data", str(tmp_path / "no-data"), "--settings", "typo", "--cache", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()


def test_an_unknown_setting_is_named_with_its_neighbours_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        fs.main(["--data", str(tmp_path), "--settings", "default,default/nope", "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown settings ['default/nope']" in err and "default/general160" in err
    assert not (tmp_path / "c").exists()


def test_pareto_front_keeps_only_points_no_other_beats_on_both():
    pts = [(0.9, 1e-3), (0.8, 1e-1), (0.85, 1e-4), (0.7, 1e-1), (0.9, 1e-3)]
    assert fr._pareto_front(pts) == {(0.9, 1e-3), (0.8, 1e-1)}


def test_point_labels_that_would_overlap_are_moved_apart():
    """Two settings close on the plot: the second label moves down until the two texts no longer overlap."""
    from grun_fast.evaluation.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_yscale("log")
    ax.set_xlim(0.1, 1.0)
    ax.set_ylim(1e-30, 1.0)
    close = [(0.81, 1e-3, "npo/3000steps/general80/rank64/suffix3/editonly/retain3"),
             (0.85, 5e-4, "npo/3000steps/general80/rank64/suffix3/editonly/retain3/layers2-5/kl1"),
             (0.30, 5e-4, "left")]   # the other side of the panel: its label runs the other way, stays put
    fr._annotate(ax, close, middle=0.55)
    fig.canvas.draw()
    texts = {t.get_text(): t for t in ax.texts}
    boxes = [texts[name].get_window_extent() for _, _, name in close[:2]]
    assert not boxes[0].overlaps(boxes[1])
    assert texts["left"].arrow_patch is None   # not moved: no line back to its point
    plt.close(fig)


def test_wrapped_labels_break_after_slashes_and_do_not_overlap():
    from grun_fast.evaluation.report import _pyplot

    assert fr._wrap("simnpo/3000steps/general160/rank64/suffix3", 20) == "simnpo/3000steps/\ngeneral160/rank64/\nsuffix3"
    assert fr._wrap("a-very-long-single-segment", 5) == "a-very-long-single-segment"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_yscale("log")
    ax.set_xlim(0.78, 0.9)
    ax.set_ylim(1e-3, 2.0)
    close = [(0.84, 0.012, "simnpo/3000steps/general160/rank64/suffix3/editonly/retain4/beta1+t0.5"),
             (0.85, 0.011, "simnpo/3000steps/general80/rank64/suffix3/editonly/retain3/beta1+t0.7"),
             (0.852, 0.010, "default/general160")]
    fr._annotate(ax, close, middle=0.8, wrap=40)
    fig.canvas.draw()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t) for t in ax.texts]   # the texts alone, without the lines to their points
    assert len(boxes) == 3 and all("\n" in t.get_text() for t in ax.texts[:2])
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(3) for j in range(i + 1, 3))
    plt.close(fig)


def test_summary_counts_leaks_on_the_forget_and_the_reworded_forget_questions():
    from grun_fast.evaluation.metrics import leak_summary

    forget = {"rouge_l": 0.1, "truth_ratio": 0.6, "rows": [], "gate": {},
              "leaks": leak_summary([0.9, 0.1, 0.2]),
              "paraphrased_question": {"rouge_l": 0.3, "leaks": leak_summary([0.5, 0.7, 0.49, 0.0])}}
    out = fs.summary({"splits": {"forget": forget, "retain": {"rouge_l": 0.9, "gate": {}}}})
    assert (out["forget_leaks"], out["paraphrased_leaks"]) == (1, 2)
