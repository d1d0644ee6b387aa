"""UnlearnConfig: every hyperparameter of a GRUN training run, validated at construction."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any

from grun_fast.config import GATES, POSITIONS, GRUNConfig
from grun_fast.data.prompts import check_template
from grun_fast.errors import GRUNError
from grun_fast.unlearn.losses import DEFAULT_BETA, DEFAULT_FORGET_SCALE, DEFAULT_LAMBDA_R, METHODS, simnpo_beta

# Fractions of depth of the reference layers (20, 25, 31 of 32): ~62 %, 78 %, the last layer.
DEFAULT_DEPTHS = (0.625, 0.78125, 1.0)
# epochs=None: this many passes over the forget set, but at least MIN_DEFAULT_STEPS optimiser steps. An edit at
# every token needs a sharp per-token gate, and the gate sharpens with steps, not passes: tiny TOFU forget01
# (20 rows, NPO, every token) at 40 epochs = 50 steps: gates 0.63 forget / 0.14 retain, retain ROUGE-L -0.19;
# at 450 steps 0.97 / 0.01 and -0.03 (bench/results/forget_study.md).
# 60 passes over the forget rows with their answer suffixes (3000 steps on forget05 with 3 suffixes, 600 on
# forget01): the forget study's forget05 point that met every target.
DEFAULT_EPOCHS = 60
MIN_DEFAULT_STEPS = 450
# rank=None: this rank, or half the hidden size where that is smaller (tiny models). Forget05 (tiny TOFU, d=128,
# NPO at every token, 1500 steps, 80 general rows, seed 0): rank 4 / 16 / 64 gave forget quality 2.6e-14 / 1.9e-9 /
# 6.5e-4; rank 128, the full hidden size, lost the retain answers (ROUGE-L 0.62).
DEFAULT_RANK = 64
# answer_suffixes=None: this many per forget row for the likelihood objectives, 0 for the others (idk trains on
# refusals; gd and rmu were not measured with them).
DEFAULT_ANSWER_SUFFIXES = {"npo": 3, "simnpo": 3}


# Fields added after checkpoints were first written, with the value that reproduces what a checkpoint written
# without the field was trained with (resuming it must continue that run, not today's default). Before
# suffix_gate existed (2026-12-03) the answer-suffix rows always trained the gate; before retain_kl, no KL term;
# before gate_threshold and deploy_threshold, the soft gate.
ADDED_FIELDS: dict[str, Any] = {"suffix_gate": True, "retain_kl": 0.0, "gate_threshold": None,
                                "deploy_threshold": None}


def _check_number(name: str, value: Any) -> None:
    """A finite real number (not a bool, not a string), else GRUNError naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise GRUNError(f"{name} must be a finite number, got {value!r}")


def default_layers(num_layers: int) -> list[int]:
    """The reference choice of layers scaled to a model of ``num_layers`` layers (e.g. [2, 3] for 4)."""
    return sorted({min(num_layers - 1, int(f * num_layers)) for f in DEFAULT_DEPTHS})


@dataclass
class UnlearnConfig:
    """Hyperparameters of one GRUN run (defaults: GRUN.md section 4).

    layers: decoder layers to edit (None: ~62 %, 78 % and 100 % of depth, as in the reference code).
    rank: rank of the edit (None: DEFAULT_RANK, or half the model's hidden size where smaller; ``for_model``).
    batch_size: forget rows per optimiser step over all processes; each is paired with one retain row.
    epochs: passes over the forget set; None (default): DEFAULT_EPOCHS passes and at least MIN_DEFAULT_STEPS
        steps. max_steps, when set, wins (``steps``).
    lambda_r, forget_scale: None picks the method's default (gd: 2 and 1; npo: 4 and 10; simnpo: 4 and 10;
        idk, rmu: 1, 1).
    beta: NPO/SimNPO temperature; None picks the method's: npo 0.1 (on summed NLL); simnpo by the number of forget
        rows (on mean NLL; ``for_data``): 2 up to 40 rows, 1 from 200 on (``losses.simnpo_beta``).
    weight_decay: AdamW weight decay of W, b and the gate; the rotation never decays (GRUN.md section 8).
    rmu_layer: layer whose output RMU steers (None: the last decoder layer); rmu_coefficient: c.
    template: prompt format: "auto" (the tokenizer's chat template when it has one, else "plain"), "plain",
        "chat", or a format string with one {question} (``grun_fast.data.prompts``); the adapter records the
        resolved format.
    augment_formats: draw each training row's prompt (forget and retain alike, seeded by its position in the
        run) from the variants of the format (``prompts.format_variants``: trailing space/newline or none,
        chat with/without system prompt, the bare question), so the gate learns the content, not the format.
    answer_suffixes: per forget row, this many extra forget rows whose answer starts at a later word (seeded;
        ``grun_fast.data.with_answer_suffixes``), so that the edit also suppresses the answer's facts after other
        lead-ins (a reworded answer); epochs count passes over the enlarged set. None: 3 for npo and simnpo, else
        0. Not with idk (refusal targets).
    suffix_gate: whether the answer-suffix rows also train the gate (-> 1). False (default): they train the edit
        only and the gate learns from the whole forget rows, as without suffixes.
    gate_threshold: train and deploy with this hard gate threshold (tokens whose gate is below it are not
        edited, in training as in the saved adapter; None: the soft gate edits everywhere). Deploying a
        threshold on an adapter trained without one removes small edits the trained adapter relies on.
    deploy_threshold: train with the soft gate, then run (and save) the adapter with this hard gate threshold
        (``grun_fast.set_gate_threshold``): the edits on rows the gate half opens on go. Not with gate_threshold.
    retain_kl: weight of KL(frozen || edited) between the next-token distributions at the retain answers' tokens,
        next to the retain NLL term (lambda_r), which holds only the answer token's probability (0: off; not rmu).
    save_steps: write a resumable checkpoint every N steps (None: none).
    cache_lower_mb: memory budget for reusing the frozen layers' outputs below the lowest edited layer
        (computed once per example, reused every epoch); 0 turns the cache off.
    cache_prefix: also reuse the frozen model's keys/values of each prompt (the tokens before the edit, which
        the adapter cannot change) within that budget, and run each step on the answer part only.
    """

    # SimNPO (beta 1, retain weight 4) with a rank-64 gated edit at every token and 3 answer suffixes per forget
    # row, 60 epochs: the forget study's point that met every target on forget05 with general rows in the
    # retain set (bench/results/forget_study.md). Edits at the last prompt token left forget quality at the base's.
    method: str = "simnpo"
    layers: list[int] | None = None
    rank: int | None = None
    # MLP gate by default: with prompt-format augmentation (on by default) a linear gate cannot tell forget from
    # retain rows across formats. Tiny TOFU (20 forget01 + 80 retain rows, NPO x10, 120 steps, seeds 0-2,
    # medians): linear retain ROUGE-L 0.997 -> 0.886, gates 0.946 / 0.179; mlp 0.997 -> 0.997, 0.9996 / 0.004.
    gate: str = "mlp"
    positions: str = "all"
    adapter_name: str = "default"
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 4e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    lambda_r: float | None = None
    lambda_g: float = 10.0
    # 0 by default: forget05 (tiny TOFU, seed 0, the 3 edit-only suffix setting) it kept the retain answers exactly
    # but cost forget quality at every weight tried (0.3: 9.7e-4 -> 1.1e-5; 1: -> 1.8e-5)
    retain_kl: float = 0.0
    gate_threshold: float | None = None
    deploy_threshold: float | None = None
    forget_scale: float | None = None
    beta: float | None = None
    rmu_coefficient: float = 300.0
    rmu_layer: int | None = None
    template: str = "auto"
    augment_formats: bool = True
    answer_suffixes: int | None = None
    # False by default: forget05 (tiny TOFU, 3000 steps, rank 64, 80 general rows, 3 suffixes, retain weight 3,
    # seeds 0-2) gated suffixes: FQ 4.3e-4 / MU 0.747 (medians); edit-only: 3.0e-3 / 0.813
    suffix_gate: bool = False
    max_length: int = 256
    seed: int = 0
    save_steps: int | None = None
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    reference_batch_size: int = 32
    cache_lower_mb: int = 1024
    cache_prefix: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise GRUNError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.layers is not None:
            self.layers = GRUNConfig(layers=self.layers).layers  # integer check with the core's message
        for name in ("gate_threshold", "deploy_threshold"):  # range check with the core's message
            if getattr(self, name) is not None:
                try:
                    setattr(self, name, GRUNConfig(layers=[0], gate_threshold=getattr(self, name)).gate_threshold)
                except GRUNError as e:
                    raise GRUNError(str(e).replace("gate_threshold", name)) from None
        if self.gate_threshold is not None and self.deploy_threshold is not None:
            raise GRUNError("set gate_threshold (train and deploy with it) or deploy_threshold (train with the soft "
                            "gate, deploy with it), not both")
        if self.gate not in GATES:
            raise GRUNError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATES)}")
        if self.positions not in POSITIONS:
            raise GRUNError(f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")
        for name in ("batch_size", "rank", "max_length", "logging_steps", "reference_batch_size"):
            value = getattr(self, name)
            if name == "rank" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GRUNError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("epochs", "max_steps", "save_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise GRUNError(f"{name} must be an integer >= 1 (or unset, for the default), got {value!r}")
        for name in ("lr", "rmu_coefficient", "weight_decay", "max_grad_norm", "lambda_g", "warmup_ratio",
                     "retain_kl"):
            _check_number(name, getattr(self, name))
        for name in ("lambda_r", "forget_scale", "beta"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name))
        if self.beta is None and self.method != "simnpo":   # simnpo's depends on the forget rows (for_data)
            self.beta = DEFAULT_BETA.get(self.method, DEFAULT_BETA["npo"])
        for name in ("lr", "beta", "rmu_coefficient"):
            if not (name == "beta" and self.beta is None) and not getattr(self, name) > 0:
                raise GRUNError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("seed", "rmu_layer"):
            value = getattr(self, name)
            if (value is not None or name == "seed") and (isinstance(value, bool) or not isinstance(value, int)):
                raise GRUNError(f"{name} must be an integer, got {value!r}")
        for name in ("gradient_checkpointing", "progress", "augment_formats", "suffix_gate"):
            if not isinstance(getattr(self, name), bool):
                raise GRUNError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.answer_suffixes is None:
            self.answer_suffixes = DEFAULT_ANSWER_SUFFIXES.get(self.method, 0)
        for name in ("answer_suffixes", "cache_lower_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise GRUNError(f"{name} must be an integer >= 0, got {value!r}")
        if self.answer_suffixes and self.method == "idk":
            raise GRUNError("answer_suffixes needs the forget answers as targets; method 'idk' trains on refusals "
                            "instead (use 0)")
        if self.retain_kl and self.method == "rmu":
            raise GRUNError("retain_kl acts on the retain rows' next-token distributions; method 'rmu' holds their "
                            "hidden states instead (use 0)")
        if not isinstance(self.cache_prefix, bool):
            raise GRUNError(f"cache_prefix must be True or False, got {self.cache_prefix!r}")
        for name in ("weight_decay", "max_grad_norm", "lambda_g", "lambda_r", "forget_scale", "retain_kl"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise GRUNError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise GRUNError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not isinstance(self.adapter_name, str) or not self.adapter_name or "." in self.adapter_name:
            raise GRUNError(f"adapter_name must be a non-empty string without dots, got {self.adapter_name!r}")
        check_template(self.template)
        if self.lambda_r is None:
            self.lambda_r = DEFAULT_LAMBDA_R[self.method]
        if self.forget_scale is None:
            self.forget_scale = DEFAULT_FORGET_SCALE[self.method]

    def for_model(self, hidden_size: int) -> "UnlearnConfig":
        """This config with what depends on the model filled in: rank None -> DEFAULT_RANK, or half the hidden size
        where that is smaller."""
        if self.rank is not None:
            return self
        return dataclasses.replace(self, rank=max(1, min(DEFAULT_RANK, hidden_size // 2)))

    def for_data(self, n_forget: int) -> "UnlearnConfig":
        """This config with what depends on the forget set filled in: beta None (simnpo) -> ``simnpo_beta`` of its
        ``n_forget`` rows (before answer suffixes)."""
        if self.beta is not None:
            return self
        return dataclasses.replace(self, beta=simnpo_beta(n_forget))

    def grun_config(self, num_layers: int) -> GRUNConfig:
        """The adapter's GRUNConfig, layers resolved (and range-checked) for a model of ``num_layers``."""
        if self.rank is None:
            raise GRUNError("rank is unset: resolve it for the model first (UnlearnConfig.for_model)")
        layers = self.layers if self.layers is not None else default_layers(num_layers)
        config = GRUNConfig(layers=layers, rank=self.rank, gate=self.gate, positions=self.positions)
        return GRUNConfig(layers=config.resolve_layers(num_layers), rank=self.rank, gate=self.gate,
                          positions=self.positions, gate_threshold=self.gate_threshold)

    def steps(self, n_forget: int) -> int:
        """Optimiser steps of a run over ``n_forget`` forget rows: max_steps; else ``epochs`` passes; else
        DEFAULT_EPOCHS passes and at least MIN_DEFAULT_STEPS."""
        if self.max_steps is not None:
            return self.max_steps
        epochs = self.epochs if self.epochs is not None else DEFAULT_EPOCHS
        steps = math.ceil(epochs * n_forget / self.batch_size)
        return steps if self.epochs is not None else max(steps, MIN_DEFAULT_STEPS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UnlearnConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise GRUNError(f"unknown UnlearnConfig fields {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> "UnlearnConfig":
        return dataclasses.replace(self, **changes)
