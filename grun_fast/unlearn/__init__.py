"""GRUN training: losses, the Trainer subclass, the ``unlearn()`` API and the ``grun-fast unlearn`` command.

    result = grun_fast.unlearn.unlearn(model, tokenizer, forget_rows, retain_rows, method="npo", out="adapter/")
    result.model.generate(...)          # the model is patched in place with the new adapter
"""
from grun_fast.unlearn.config import UnlearnConfig, default_layers
from grun_fast.unlearn.losses import METHODS
from grun_fast.unlearn.hf_trainer import GRUNTrainer, TrainingDiverged, reference_nll
from grun_fast.unlearn.trainer import UnlearnResult, unlearn

__all__ = ["UnlearnConfig", "default_layers", "METHODS", "GRUNTrainer", "TrainingDiverged", "UnlearnResult",
           "reference_nll", "unlearn"]
