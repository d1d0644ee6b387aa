"""The forget study's settings (bench/forget_study.py): one named GRUN training setting per entry, as
UnlearnConfig overrides plus a few keys the study reads itself (STUDY_KEYS). Older settings are pinned to the
defaults they were measured on (``v01``), so that a name keeps meaning what its CSV rows measured."""
from __future__ import annotations

from typing import Any

# NPO at every token for 120 epochs (1500 steps on forget05): the base of the gate-negative settings below
NPO_ALL_120EP: dict[str, Any] = {"library_defaults": True, "method": "npo", "positions": "all", "epochs": 120}


def npo_steps(steps: int, **overrides: Any) -> dict[str, Any]:
    """NPO at every token for a fixed number of steps, rank 64, 80 general rows: the base of the suffix settings."""
    return {**NPO_ALL_120EP, "epochs": None, "max_steps": steps, "rank": 64, "negatives": "general:80", **overrides}


# Each setting: UnlearnConfig overrides on top of `grun-fast unlearn`'s 0.1 defaults (V01_DEFAULTS, below), plus
# the plan's steps.
SETTINGS: dict[str, dict[str, Any]] = {
    # `grun-fast unlearn` as a user got it before version 0.2.0 (V01_DEFAULTS), its own epochs (no --steps)
    "v0.1-default": {"library_defaults": True},
    # NPO at every token with the library's epochs (40: 80 steps on forget01, 500 on forget05) and variants
    "npo/all/40ep": {"library_defaults": True, "method": "npo", "positions": "all"},
    "npo/all/40ep/retain5": {"library_defaults": True, "method": "npo", "positions": "all", "lambda_r": 5.0},
    "npo/all/40ep/gate30": {"library_defaults": True, "method": "npo", "positions": "all", "lambda_g": 30.0},
    "npo/all/40ep/retain5/gate30": {"library_defaults": True, "method": "npo", "positions": "all", "lambda_r": 5.0,
                                    "lambda_g": 30.0},
    "npo/all/120ep": {"library_defaults": True, "method": "npo", "positions": "all", "epochs": 120},
    "npo/all/120ep/t0.5": {"library_defaults": True, "method": "npo", "positions": "all", "epochs": 120,
                           "deploy_threshold": 0.5},
    "npo/all/120ep/retain5": {"library_defaults": True, "method": "npo", "positions": "all", "epochs": 120,
                              "lambda_r": 5.0},
    # the defaults with 200 more retain rows that neither model was trained on (TOFU retain90 rows outside the
    # evaluation's retain_perturbed): more varied questions for the gate to stay closed on; the retain term only
    # asks the edit not to change the base's answers to them
    "v0.1-default/unseen-retain200": {"library_defaults": True, "unseen_retain_rows": 200},
    # gate negatives: 80 more retain rows unlike the forget rows, for the gate to stay closed on (`negatives`,
    # see negative_rows); "general" rows are world-facts/real-authors rows outside the evaluation's
    "v0.1-default/shuffled80": {"library_defaults": True, "negatives": "shuffled:80"},
    "v0.1-default/noise80": {"library_defaults": True, "negatives": "noise:80"},
    "v0.1-default/general80": {"library_defaults": True, "negatives": "general:80"},
    "npo/all/120ep/shuffled80": {**NPO_ALL_120EP, "negatives": "shuffled:80"},
    "npo/all/120ep/noise80": {**NPO_ALL_120EP, "negatives": "noise:80"},
    "npo/all/120ep/general80": {**NPO_ALL_120EP, "negatives": "general:80"},
    "npo/all/120ep/general160": {**NPO_ALL_120EP, "negatives": "general:160"},
    "npo/all/120ep/general80/rank16": {**NPO_ALL_120EP, "rank": 16, "negatives": "general:80"},
    "npo/all/120ep/general80/rank64": {**NPO_ALL_120EP, "rank": 64, "negatives": "general:80"},
    "npo/all/160ep/general80/rank64": {**NPO_ALL_120EP, "epochs": 160, "rank": 64, "negatives": "general:80"},
    "npo/all/240ep/general80/rank64": {**NPO_ALL_120EP, "epochs": 240, "rank": 64, "negatives": "general:80"},
    # NPO's pull fades once the forget answer is far below the reference (beta * excess NLL >> 1); a lower beta
    # keeps it pulling for longer
    "npo/all/160ep/general80/rank64/beta0.02": {**NPO_ALL_120EP, "epochs": 160, "rank": 64, "negatives": "general:80",
                                                "beta": 0.02},
    # the forget rows plus answer suffixes (UnlearnConfig.answer_suffixes), first also training the gate
    # (suffix_gate True): 1 each, 2000 steps over twice the rows
    "npo/2000steps/general80/rank64/suffix1": npo_steps(2000, answer_suffixes=1, suffix_gate=True),
    "npo/3000steps/general80/rank64/suffix3": npo_steps(3000, answer_suffixes=3, suffix_gate=True),
    # the same suffixes on the retain rows (1 each, `retain_suffixes`): fragment-start answers the gate must stay
    # shut on, so that "the answer starts mid-sentence" is no cue for it to open
    "npo/2000steps/general80/rank64/suffix1/retainsuffix1": npo_steps(2000, answer_suffixes=1, suffix_gate=True,
                                                                      retain_suffixes=1),
    "npo/3000steps/general80/rank64/suffix3/retainsuffix1": npo_steps(3000, answer_suffixes=3, suffix_gate=True,
                                                                      retain_suffixes=1),
    # deployed with a hard gate threshold of 0.5 (the edit off where the gate is below it; `--also-threshold 0.5`
    # measures this on the same adapter as the setting without it)
    "npo/3000steps/general80/rank64/suffix3/t0.5": npo_steps(3000, answer_suffixes=3, suffix_gate=True,
                                                             deploy_threshold=0.5),
    # 3 suffixes with a heavier retain term, or a lighter NPO push (the library's forget_scale for npo is 10)
    "npo/3000steps/general80/rank64/suffix3/retain3": npo_steps(3000, answer_suffixes=3, suffix_gate=True,
                                                                lambda_r=3.0),
    "npo/3000steps/general80/rank64/suffix3/retain5": npo_steps(3000, answer_suffixes=3, suffix_gate=True,
                                                                lambda_r=5.0),
    "npo/3000steps/general80/rank64/suffix3/scale3": npo_steps(3000, answer_suffixes=3, suffix_gate=True,
                                                               forget_scale=3.0),
    "npo/3000steps/general160/rank64/suffix1": npo_steps(3000, negatives="general:160", answer_suffixes=1,
                                                         suffix_gate=True),
    # the suffix rows through the edit loss only (suffix_gate False, the library's default): the gate learns from
    # whole rows, as without suffixes, for fewer general answers that open it
    "npo/3000steps/general80/rank64/suffix3/editonly": npo_steps(3000, answer_suffixes=3, suffix_gate=False),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3": npo_steps(3000, answer_suffixes=3, suffix_gate=False,
                                                                         lambda_r=3.0),
    "npo/3000steps/general80/rank64/suffix2/editonly/retain3": npo_steps(3000, answer_suffixes=2, suffix_gate=False,
                                                                         lambda_r=3.0),
    "npo/3000steps/general80/rank64/suffix6/editonly/retain3": npo_steps(3000, answer_suffixes=6, suffix_gate=False,
                                                                         lambda_r=3.0),
    "npo/4000steps/general80/rank64/suffix3/editonly/retain3": npo_steps(4000, answer_suffixes=3, suffix_gate=False,
                                                                         lambda_r=3.0),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain2": npo_steps(3000, answer_suffixes=3, suffix_gate=False,
                                                                         lambda_r=2.0),
    # SimNPO (mean token NLL, no reference) at the best NPO point: its push fades once an answer's mean token NLL
    # passes a few nats, where NPO's summed-NLL push carries on; the NPO point's forget truth ratios spread
    # twice as wide as the retain model's (seed 0, log ratios: sd 1.02 against 0.52)
    "simnpo/3000steps/general80/rank64/suffix3/editonly/retain3": npo_steps(
        3000, method="simnpo", answer_suffixes=3, suffix_gate=False, lambda_r=3.0),
    # its push fades later with a lower beta (at beta 2.5 the ratios stayed narrow but kept preferring the truth)
    "simnpo/3000steps/general80/rank64/suffix3/editonly/retain3/beta1": npo_steps(
        3000, method="simnpo", answer_suffixes=3, suffix_gate=False, lambda_r=3.0, beta=1.0),
    # beta 1 reached forget quality 0.47 at model utility 0.81 (seed 0; weakest part: the retain truth ratio): the
    # retain rows' whole next-token distributions held too (retain_kl 0.3 raised NPO's utility by 0.03 at seed 0),
    # or more answer suffixes (6 raised it by ~0.01 at the NPO point)
    "simnpo/3000steps/general80/rank64/suffix3/editonly/retain3/beta1/kl0.3": npo_steps(
        3000, method="simnpo", answer_suffixes=3, suffix_gate=False, lambda_r=3.0, beta=1.0, retain_kl=0.3),
    "simnpo/3000steps/general80/rank64/suffix6/editonly/retain3/beta1": npo_steps(
        3000, method="simnpo", answer_suffixes=6, suffix_gate=False, lambda_r=3.0, beta=1.0),
    # deployed with threshold 0.5 (--also-threshold 0.5) beta 1 met every target but the retain answers' (seeds
    # 0-2, ROUGE-L 0.837 against the base's 0.893): the threshold removes small edits the soft-trained adapter
    # relies on. Trained with the threshold (UnlearnConfig.gate_threshold), the edit learns without them
    "simnpo/3000steps/general80/rank64/suffix3/editonly/retain3/beta1/trained-t0.5": npo_steps(
        3000, method="simnpo", answer_suffixes=3, suffix_gate=False, lambda_r=3.0, beta=1.0, gate_threshold=0.5),
    # a heavier retain term for the retain answers that deployment at 0.5 costs (0.006 ROUGE-L short at retain 3)
    "simnpo/3000steps/general80/rank64/suffix3/editonly/retain4/beta1": npo_steps(
        3000, method="simnpo", answer_suffixes=3, suffix_gate=False, lambda_r=4.0, beta=1.0),
    # at 0.5 retain weight 4 lost model utility on the general questions (world facts), where the gate opens
    # part-way: twice the general rows for it to stay shut on, or training at a lower threshold (0.3) so that
    # deployment at 0.5 removes fewer edits the adapter relies on
    "simnpo/3000steps/general160/rank64/suffix3/editonly/retain4/beta1": npo_steps(
        3000, method="simnpo", negatives="general:160", answer_suffixes=3, suffix_gate=False, lambda_r=4.0, beta=1.0),
    "simnpo/3000steps/general80/rank64/suffix3/editonly/retain4/beta1/trained-t0.3": npo_steps(
        3000, method="simnpo", answer_suffixes=3, suffix_gate=False, lambda_r=4.0, beta=1.0, gate_threshold=0.3),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3/gate20": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, lambda_g=20.0),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3/layers2-5": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, layers=[2, 3, 4, 5]),
    # the retain rows' whole next-token distributions held at the frozen model's (retain_kl), not only their answers
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3/kl3": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, retain_kl=3.0),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3/kl1": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, retain_kl=1.0),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3/kl0.3": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, retain_kl=0.3),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3/layers2-5/kl1": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, layers=[2, 3, 4, 5], retain_kl=1.0),
    "npo/3000steps/general80/rank96/suffix3/editonly/retain3": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, rank=96),
    # a gate loss weighted 3x (lambda_g 30): a sharper gate, for fewer world-facts questions that open it
    "npo/all/160ep/general80/rank64/gate30": {**NPO_ALL_120EP, "epochs": 160, "rank": 64, "negatives": "general:80",
                                              "lambda_g": 30.0},
    "npo/all/120ep/general160/rank64": {**NPO_ALL_120EP, "rank": 64, "negatives": "general:160"},
    "npo/all/120ep/general160/rank128": {**NPO_ALL_120EP, "rank": 128, "negatives": "general:160"},
    "npo/all/120ep/general160/rank16": {**NPO_ALL_120EP, "rank": 16, "negatives": "general:160"},
    "gd": {"method": "gd", "positions": "last_prompt"},
    "npo": {"method": "npo", "positions": "last_prompt"},
    "simnpo": {"method": "simnpo", "positions": "last_prompt"},
    "idk": {"method": "idk", "positions": "last_prompt"},
    "rmu": {"method": "rmu", "positions": "last_prompt"},
    "gd/all": {"method": "gd", "positions": "all"},
    "npo/all": {"method": "npo", "positions": "all"},
    "simnpo/all": {"method": "simnpo", "positions": "all"},
    "idk/all": {"method": "idk", "positions": "all"},
    # around the first point that moved forget quality (npo/all): gate, deployment threshold, rank, layers, steps
    "npo/all/t0.5": {"method": "npo", "positions": "all", "deploy_threshold": 0.5},
    "npo/all/linear": {"method": "npo", "positions": "all", "gate": "linear"},
    "npo/all/rank16": {"method": "npo", "positions": "all", "rank": 16},
    "npo/all/layers1-5": {"method": "npo", "positions": "all", "layers": [1, 2, 3, 4, 5]},
    "npo/all/3xsteps": {"method": "npo", "positions": "all", "steps_factor": 3},
    "npo/all/retain5": {"method": "npo", "positions": "all", "lambda_r": 5.0},
    "npo/all/retain5/t0.5": {"method": "npo", "positions": "all", "lambda_r": 5.0, "deploy_threshold": 0.5},
}

# UnlearnConfig's defaults before 0.2.0, which every setting above was measured on (the 0.2.0 defaults are the
# retain-weight-4 point with 160 general rows); pinned so that each setting keeps meaning what it measured
V01_DEFAULTS: dict[str, Any] = {"method": "npo", "rank": 4, "answer_suffixes": 0}
V01_SIMNPO: dict[str, Any] = {"beta": 2.5, "lambda_r": 1.0}


def v01(setting: dict[str, Any]) -> dict[str, Any]:
    """``setting`` on the 0.1 defaults; ``v01_steps`` where it took the library's epochs (40, >= 450 steps)."""
    out = {**V01_DEFAULTS, **setting}
    if out["method"] == "simnpo":
        out = {**V01_SIMNPO, **out}
    if out["method"] == "npo":   # NPO's retain weight before 0.2.1
        out = {"lambda_r": 1.0, **out}
    if out.get("library_defaults") and out.get("epochs") is None and out.get("max_steps") is None:
        out["v01_steps"] = True
    return out


SETTINGS = {name: v01(setting) for name, setting in SETTINGS.items()}
# `grun-fast unlearn` exactly as a user gets it (no overrides, its own epochs), on the pipeline's retain rows and
# with 160 general rows in the retain set, as the README advises
SETTINGS["default"] = {"library_defaults": True}
SETTINGS["default/general160"] = {"library_defaults": True, "negatives": "general:160"}
# 0.2.0's defaults on forget01 (SimNPO beta 1 for every size; on forget05, 200 rows, today's beta is 1 too): the
# truth ratios overshoot past the retain model's. Around it: half the epochs, or a narrower edit
SETTINGS["default/beta1"] = {"library_defaults": True, "beta": 1.0}
SETTINGS["default/general160/beta1"] = {"library_defaults": True, "negatives": "general:160", "beta": 1.0}
SETTINGS["default/general160/beta1/30ep"] = {**SETTINGS["default/general160/beta1"], "epochs": 30}
SETTINGS["default/general160/beta1/45ep"] = {**SETTINGS["default/general160/beta1"], "epochs": 45}
SETTINGS["default/general160/beta1/rank16"] = {**SETTINGS["default/general160/beta1"], "rank": 16}
# SimNPO beta 2: the push saturates at about half the forget answers' NLL of beta 1 (training log, forget01 seed 0:
# 6.6 vs 12.4 nats per token at the end); 0.2.1's default for 40 forget rows
SETTINGS["default/beta2"] = {"library_defaults": True, "beta": 2.0}
SETTINGS["default/general160/beta2"] = {"library_defaults": True, "negatives": "general:160", "beta": 2.0}
# NPO at the defaults (its own beta 0.1, retain weight 1, forget x10; rank, suffixes and epochs as simnpo's)
SETTINGS["default/npo"] = {"library_defaults": True, "method": "npo"}
SETTINGS["default/general160/npo"] = {"library_defaults": True, "negatives": "general:160", "method": "npo"}
# with 0.2.0's NPO retain weight, 1
SETTINGS["default/npo/retain1"] = {**SETTINGS["default/npo"], "lambda_r": 1.0}
SETTINGS["default/general160/npo/retain1"] = {**SETTINGS["default/general160/npo"], "lambda_r": 1.0}


# setting keys the study reads itself; every other key is an UnlearnConfig field
STUDY_KEYS = ("library_defaults", "steps_factor", "deploy_threshold", "unseen_retain_rows", "negatives",
              "retain_suffixes", "v01_steps")


def split_setting(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the study's own options, the UnlearnConfig overrides) of one setting; the overrides are checked by
    building the config, so that a typo fails before any model is trained."""
    from grun_fast.errors import GRUNError
    from grun_fast.unlearn.config import UnlearnConfig

    setting = SETTINGS[name]
    study = {k: v for k, v in setting.items() if k in STUDY_KEYS}
    overrides = {k: v for k, v in setting.items() if k not in STUDY_KEYS}
    try:
        UnlearnConfig(**overrides)
    except (TypeError, GRUNError) as e:
        raise GRUNError(f"forget study setting {name!r}: {e}") from None
    return study, overrides
