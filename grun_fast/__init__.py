"""grun_fast: fast GRUN (gated representation unlearning) for Hugging Face causal language models.

    model = grun_fast.patch(model, "path/to/adapter")   # then model.generate(...) as usual
"""
from grun_fast.adapters import import_reference_checkpoint, read_adapter
from grun_fast.config import GRUNConfig
from grun_fast.errors import GRUNError
from grun_fast.module import GatedLoReFT
from grun_fast.patching import (
    adapter_config,
    adapter_modules,
    adapter_names,
    adapter_parameters,
    disable_adapters,
    edit_at,
    patch,
    save_adapter,
    set_gate_threshold,
    unpatch,
)
from grun_fast.version import __version__

__all__ = [
    "GRUNConfig",
    "GRUNError",
    "GatedLoReFT",
    "adapter_config",
    "adapter_modules",
    "adapter_names",
    "adapter_parameters",
    "disable_adapters",
    "edit_at",
    "import_reference_checkpoint",
    "patch",
    "read_adapter",
    "save_adapter",
    "set_gate_threshold",
    "unpatch",
    "__version__",
]
