"""`python -m tests.fsdp_cpu ARGS`: `grun_fast.cli` with accelerate's FSDP plugin allowed on CPU processes.

accelerate (1.15) attaches its FSDP plugin only for accelerator devices (MULTI_GPU, MULTI_XPU, ...); on CPU
processes (MULTI_CPU, gloo) it silently drops the plugin and trains replicated. torch's FSDP2 itself runs on
CPU with gloo, so this shim re-attaches the plugin that `accelerate launch --config_file
configs/accelerate_fsdp.yaml` built, and the Trainer then takes its real FSDP path (accelerate's
fully_shard preparation, sharded optimizer, FSDP gradient clipping), the one a GPU run takes.

With GRUN_FSDP_REPORT set, each process writes `<GRUN_FSDP_REPORT>.<rank>` (JSON) after training: whether
the Trainer ran FSDP, how many FSDP units it made, and a base weight's local and full sizes.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_allowing_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


def _report(trainer) -> dict:
    from torch.distributed.fsdp import FSDPModule

    model = trainer.grun_model
    weight = model.model.layers[0].mlp.gate_proj.weight
    adapter = next(p for n, p in model.named_parameters() if n.startswith("grun_adapters."))
    return {
        "fsdp": bool(trainer.is_fsdp_enabled),
        "units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "base_local": weight.to_local().numel() if hasattr(weight, "to_local") else weight.numel(),
        "base_full": weight.numel(),
        "adapter_sharded": hasattr(adapter, "to_local"),
    }


def main() -> int:
    AcceleratorState.__init__ = _init_allowing_cpu_fsdp
    report_path = os.environ.get("GRUN_FSDP_REPORT")
    if report_path:
        from grun_fast.unlearn import GRUNTrainer

        train = GRUNTrainer.train

        def train_and_report(self, *args, **kwargs):
            result = train(self, *args, **kwargs)
            Path(f"{report_path}.{os.environ.get('RANK', '0')}").write_text(json.dumps(_report(self)))
            return result

        GRUNTrainer.train = train_and_report
    from grun_fast.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
