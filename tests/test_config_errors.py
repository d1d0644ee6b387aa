"""Every bad field of GRUNConfig and UnlearnConfig raises GRUNError naming the field (never a bare error)."""
import math

import numpy as np
import pytest

from grun_fast import GRUNConfig, GRUNError
from grun_fast.unlearn import UnlearnConfig


@pytest.mark.parametrize("fields, match", [
    (dict(gate_threshold="abc"), "gate_threshold must be None or a number in \\[0, 1\\], got 'abc'"),
    (dict(gate_threshold=float("nan")), "gate_threshold .* got nan"),
    (dict(gate_threshold=True), "gate_threshold .* got True"),
    (dict(gate_threshold=1.5), "gate_threshold .* got 1.5"),
    (dict(gate_threshold=[0.5]), "gate_threshold .* got \\[0.5\\]"),
    (dict(gate_hidden=("a",)), "gate_hidden must be a sequence of integer widths, got \\('a',\\)"),
    (dict(gate_hidden=(1.5, 4)), "gate_hidden must be a sequence of integer widths"),
    (dict(gate_hidden=(True,)), "gate_hidden must be a sequence of integer widths"),
    (dict(gate_hidden=256), "gate_hidden must be a sequence of integer widths, got 256"),
    (dict(gate_hidden="64"), "gate_hidden must be a sequence of integer widths, got '64'"),
    (dict(gate_hidden=(0,)), "gate_hidden widths must be >= 1"),
    (dict(layers=["a"]), "layers must be a list of integers"),
    (dict(layers=[1.5]), "layers must be a list of integers"),
    (dict(layers=[]), "at least one decoder layer"),
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank="4"), "rank must be an integer >= 1"),
    (dict(gate="conv"), "unknown gate 'conv'"),
    (dict(positions="every"), "unknown positions 'every'"),
])
def test_grun_config_rejects(fields, match):
    with pytest.raises(GRUNError, match=match):
        GRUNConfig(**{"layers": [0], **fields})


def test_grun_config_accepts_and_normalises():
    c = GRUNConfig(layers=[0], gate_threshold=np.float32(0.25), gate_hidden=[np.int64(8), 4])
    assert c.gate_threshold == 0.25 and type(c.gate_threshold) is float
    assert c.gate_hidden == (8, 4) and all(type(w) is int for w in c.gate_hidden)
    assert GRUNConfig(layers=[0], gate_threshold=0).gate_threshold == 0.0
    assert GRUNConfig(layers=[0], gate_threshold=1).gate_threshold == 1.0


@pytest.mark.parametrize("fields, match", [
    (dict(lr="abc"), "lr must be a finite number, got 'abc'"),
    (dict(lr=float("nan")), "lr must be a finite number, got nan"),
    (dict(lr=True), "lr must be a finite number, got True"),
    (dict(beta=0), "beta must be > 0"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    (dict(max_grad_norm=float("inf")), "max_grad_norm must be a finite number"),
    (dict(lambda_g="10"), "lambda_g must be a finite number"),
    (dict(lambda_r=float("nan")), "lambda_r must be a finite number"),
    (dict(forget_scale="x"), "forget_scale must be a finite number"),
    (dict(forget_scale=-1), "forget_scale must be >= 0"),
    (dict(warmup_ratio="0.1"), "warmup_ratio must be a finite number"),
    (dict(warmup_ratio=1.0), "warmup_ratio must be in \\[0, 1\\)"),
    (dict(rmu_coefficient=math.nan), "rmu_coefficient must be a finite number"),
    (dict(seed=1.5), "seed must be an integer, got 1.5"),
    (dict(rmu_layer="last"), "rmu_layer must be an integer"),
    (dict(progress="yes"), "progress must be True or False"),
    (dict(gradient_checkpointing=1), "gradient_checkpointing must be True or False"),
    (dict(cache_lower_mb=-1), "cache_lower_mb must be an integer >= 0"),
    (dict(answer_suffixes=-1), "answer_suffixes must be an integer >= 0, got -1"),
    (dict(answer_suffixes=1.5), "answer_suffixes must be an integer >= 0"),
    (dict(answer_suffixes=1, method="idk"), "answer_suffixes needs the forget answers.*'idk'"),
    (dict(suffix_gate="no"), "suffix_gate must be True or False, got 'no'"),
    (dict(retain_kl=-1.0), "retain_kl must be >= 0, got -1.0"),
    (dict(retain_kl="x"), "retain_kl must be a finite number"),
    (dict(retain_kl=1.0, method="rmu"), "retain_kl acts on .*'rmu'"),
    (dict(gate_threshold=1.5), r"gate_threshold must be None or a number in \[0, 1\], got 1.5"),
    (dict(gate_threshold="0.5"), "gate_threshold must be None or a number in"),
    (dict(deploy_threshold=-0.1), r"deploy_threshold must be None or a number in \[0, 1\], got -0.1"),
    (dict(deploy_threshold=0.5, gate_threshold=0.5), "gate_threshold .* or deploy_threshold .* not both"),
    (dict(epochs=1.5), r"epochs must be an integer >= 1 \(or unset, for the default\), got 1.5"),
    (dict(max_steps=0), r"max_steps must be an integer >= 1 \(or unset, for the default\), got 0"),
    (dict(template="x"), "unknown prompt template 'x'"),
    (dict(method="sgd"), "unknown method 'sgd'"),
    (dict(layers=["a"]), "layers must be a list of integers"),
])
def test_unlearn_config_rejects(fields, match):
    with pytest.raises(GRUNError, match=match):
        UnlearnConfig(**fields)


def test_unlearn_config_defaults_per_method():
    assert (UnlearnConfig(method="gd").lambda_r, UnlearnConfig(method="gd").forget_scale) == (2.0, 1.0)
    assert (UnlearnConfig(method="npo").lambda_r, UnlearnConfig(method="npo").forget_scale) == (4.0, 10.0)
    assert UnlearnConfig(method="npo", forget_scale=100).forget_scale == 100
    assert UnlearnConfig(rmu_layer=-1, seed=3).rmu_layer == -1
