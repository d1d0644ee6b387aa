"""FSDP for GRUNTrainer: accelerate's FSDP2 plugin (``configs/accelerate_fsdp.yaml``) shards the frozen base.

The adapter lives in the root FSDP unit (with the embeddings, final norm and LM head), so its parameters
are sharded DTensors too. What the Trainer's own FSDP path would do wrong for an adapter-only run, and
this mixin does instead: save the adapter gathered from its shards (not the whole model's state dict, which
for a 70B base is the base), checkpoint only the optimizer state (sharded) and the scheduler, and on resume
scatter the saved adapter back into the shards. Each of these is a collective: every process calls it.
Without FSDP every method defers to the Trainer unchanged.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from grun_fast.patching import adapter_tensors


class FSDPAdapterMixin:
    """Mixed into GRUNTrainer ahead of ``transformers.Trainer``; needs its ``grun_model``, ``grun_config``
    and ``_save(output_dir, adapter=...)``."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP: the adapter gathered on every process, written by the main one."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir, adapter=adapter_tensors(self.grun_model, self.grun_config.adapter_name))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP: the optimizer state (the adapter's, sharded) and the scheduler; never the base."""
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                            output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))


def placed_like(modules: Mapping[int, nn.Module], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole adapter tensors (`layers.{i}.{key}`) as DTensors placed like the modules' sharded parameters;
    tensors of unsharded parameters are returned as they are. A collective (`distribute_tensor` scatters
    from the first process)."""
    from torch.distributed.tensor import distribute_tensor

    placed = dict(tensors)
    for index, module in modules.items():
        for key, value in module.state_dict().items():
            name = f"layers.{index}.{key}"
            if hasattr(value, "device_mesh") and name in placed:
                placed[name] = distribute_tensor(placed[name].to(value.dtype), value.device_mesh, value.placements)
    return placed
