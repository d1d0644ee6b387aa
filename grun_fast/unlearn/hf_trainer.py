"""``GRUNTrainer``: the Hugging Face ``Trainer`` whose loss is GRUN's objective (one forward of forget + retain rows
per step, the adapter editing from each row's edit position), and the pieces one step needs: the paired batch,
the answer-span mask and the frozen model's reference NLLs. Checkpoints hold only the adapter.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from grun_fast.adapters import read_adapter_for
from grun_fast.architectures import locate
from grun_fast.data.encoding import IGNORE_INDEX, pad_examples
from grun_fast.errors import GRUNError
from grun_fast.evaluation.report import write_text
from grun_fast.patching import (adapter_config, adapter_modules, adapter_names, disable_adapters, edit_at,
                                load_adapter_weights, save_adapter)
from grun_fast.unlearn.cache import LowerLayerCache
from grun_fast.unlearn.config import UnlearnConfig
from grun_fast.unlearn.fsdp import FSDPAdapterMixin, placed_like
from grun_fast.unlearn.losses import (answer_nll, gate_bce, gd_forget_loss_from_nll, idk_forget_loss_from_nll, mean_nll,
                                      npo_loss, retain_loss_from_nll, rmu_control_vector, rmu_forget_loss,
                                      retain_kl_loss, rmu_retain_loss, simnpo_loss, total_loss)
from grun_fast.unlearn.step import PrefixCache, batch_answer_nll

CONFIG_NAME = "unlearn_config.json"
# loss parts in the train log
# forget_nll: the forget rows' mean answer-token NLL (for idk: of the refusals; not rmu), how far the edit has
# pushed the forget answers (the base model's is near 0 on what it memorised).
LOGGED = ("forget_loss", "forget_nll", "gate_forget", "gate_loss", "gate_retain", "retain_loss", "retain_kl")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped before applying that step."""



# ----------------------------------------------------------------------------------------------- batches
def stack_pair(inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Forget rows then retain rows in one right-padded batch (one forward per step)."""
    f_ids, r_ids = inputs["forget_input_ids"], inputs["retain_input_ids"]
    width = max(f_ids.shape[1], r_ids.shape[1])

    def widen(x: torch.Tensor, fill: int) -> torch.Tensor:
        return nn.functional.pad(x, (0, width - x.shape[1]), value=fill)

    pad = int(inputs["pad_token_id"]) if "pad_token_id" in inputs else 0
    return {
        "input_ids": torch.cat([widen(f_ids, pad), widen(r_ids, pad)]),
        "attention_mask": torch.cat([widen(inputs["forget_attention_mask"], 0),
                                     widen(inputs["retain_attention_mask"], 0)]),
        "labels": torch.cat([widen(inputs["forget_labels"], IGNORE_INDEX),
                             widen(inputs["retain_labels"], IGNORE_INDEX)]),
        "edit_pos": torch.cat([inputs["forget_edit_pos"], inputs["retain_edit_pos"]]),
        "n_forget": int(f_ids.shape[0]),
        "forget_index": inputs["forget_index"],
        "retain_index": inputs["retain_index"],
    }


def answer_span_mask(attention_mask: torch.Tensor, edit_pos: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the edited token and every real token after it (where the edit acts; used by RMU)."""
    steps = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (steps[None, :] >= edit_pos[:, None]) & attention_mask.bool()


@torch.no_grad()
def reference_nll(model: nn.Module, examples: Sequence[Mapping[str, Any]], pad_token_id: int,
                  batch_size: int = 32, device: torch.device | None = None) -> torch.Tensor:
    """Summed answer NLL of each example under ``model`` as it is now ([N], fp32): NPO's S_ref.

    Computed once before training, with any adapters already on the model applied at the last prompt
    token (sequential unlearning: the reference is the model being unlearned, previous requests included).
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    patched = bool(adapter_names(model))
    out = []
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in pad_examples(examples[i:i + batch_size], pad_token_id).items()}
            if patched:
                with edit_at(model, positions=batch["edit_pos"]):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).logits
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
            out.append(answer_nll(logits, batch["labels"])[0].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- trainer
class GRUNTrainer(FSDPAdapterMixin, Trainer):
    """``Trainer`` with the GRUN objective; checkpoints hold only the adapter (plus optimiser state). FSDP's
    saving and loading of the adapter: ``grun_fast.unlearn.fsdp``."""

    def __init__(self, *args: Any, grun_model: nn.Module, grun_config: UnlearnConfig,
                 reference: torch.Tensor | None = None, retain_reference: torch.Tensor | None = None,
                 pad_token_id: int = 0, prompt_format: str | None = None,
                 gate_rows: torch.Tensor | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prompt_format = prompt_format    # the resolved prompt format, recorded in adapter_config.json
        self.grun_model = grun_model          # the unwrapped model that carries the patch state
        self.grun_config = grun_config
        self.reference = reference            # NPO: S_ref per forget row
        self.retain_reference = retain_reference  # the frozen model's summed NLL per retain example
        self.gate_rows = gate_rows            # bool per forget example: trains the gate (None: all do)
        if grun_config.beta is None and grun_config.method in ("npo", "simnpo"):
            raise ValueError("GRUNTrainer needs beta resolved for the forget set (UnlearnConfig.for_data)")
        if retain_reference is None and grun_config.method != "rmu":
            raise ValueError("GRUNTrainer needs retain_reference (the frozen model's NLL per retain example) for "
                             f"method {grun_config.method!r}")
        self.pad_token_id = pad_token_id
        self.loss_is_scaled_for_ga = False
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._captured: torch.Tensor | None = None
        self._hook = None
        self.rmu_target: torch.Tensor | None = None
        skip = min(i for name in adapter_names(grun_model) for i in adapter_config(grun_model, name).layers)
        # Not under FSDP: every forward of sharded layers is a collective, and how many forwards the cache runs
        # (one per example it has not met) differs between processes, which then deadlock or crash.
        self.lower_cache = (LowerLayerCache(grun_model, skip, grun_config.cache_lower_mb * 2**20)
                            if skip > 0 and grun_config.cache_lower_mb > 0 and not self.is_fsdp_enabled else None)
        self.answer_head = True               # LM head only where an answer token is predicted
        # the prompt prefix is adapter-independent unless a training adapter edits every token
        self.prefix_cache = (PrefixCache(grun_model, skip, grun_config.cache_lower_mb * 2**20)
                             if grun_config.cache_prefix and grun_config.cache_lower_mb > 0
                             and grun_config.method != "rmu" and grun_config.positions != "all"
                             and not grun_config.gradient_checkpointing else None)
        if grun_config.method == "rmu":
            _, layers = locate(grun_model)
            self.rmu_target = rmu_control_vector(int(grun_model.config.hidden_size), grun_config.rmu_coefficient,
                                              grun_config.seed)
            self._hook = layers[self.rmu_layer].register_forward_hook(self._capture)

    @property
    def rmu_layer(self) -> int:
        n = len(locate(self.grun_model)[1])
        layer = self.grun_config.rmu_layer
        return n - 1 if layer is None else (layer + n if layer < 0 else layer)

    def _capture(self, module, args, output):
        self._captured = output[0] if isinstance(output, tuple) else output

    def remove_hooks(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- data: the schedule is already shuffled, reproducibly; read it in order
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    # -- optimiser: AdamW; the rotation never decays (a decayed R collapsed to zero; GRUN.md section 8)
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            rotation, other = [], []
            for module in adapter_modules(self.grun_model, self.grun_config.adapter_name).values():
                for name, p in module.named_parameters():
                    (rotation if name == "rotation" else other).append(p)
            self.optimizer = torch.optim.AdamW(
                [{"params": rotation, "weight_decay": 0.0},
                 {"params": other, "weight_decay": self.grun_config.weight_decay}],
                lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon)
        return self.optimizer

    # -- one step: the edit positions stay set for the forward and the backward
    def training_step(self, model, inputs, num_items_in_batch=None):
        batch = stack_pair({**inputs, "pad_token_id": self.pad_token_id})
        batch = self._prepare_inputs(batch)
        with edit_at(self.grun_model, positions=batch["edit_pos"]):
            return super().training_step(model, batch, num_items_in_batch)

    def frozen_eval(self) -> None:
        """Every module in eval mode (``Trainer.training_step`` has just called ``model.train()``): the base
        is frozen, so its dropout must not run (the adapters have none). Under gradient checkpointing the
        decoder layers themselves keep ``training=True`` (Hugging Face checkpoints only in train mode); their
        submodules, dropout included, stay in eval mode."""
        self.grun_model.eval()
        if self.grun_config.gradient_checkpointing:
            for module in self.grun_model.modules():
                if getattr(module, "gradient_checkpointing", False) is True:
                    module.training = True

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
            value = value.clone()
            dist.all_reduce(value)
        return value

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.frozen_eval()
        cfg = self.grun_config
        nf = int(inputs["n_forget"])
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        world = self.accelerator.num_processes
        base_hidden = None
        kl: torch.Tensor | float = 0.0   # the retain KL term (retain_kl > 0 only)
        if cfg.method == "rmu":  # the retain rows' hidden states without this edit (no grad)
            with torch.no_grad(), disable_adapters(self.grun_model, cfg.adapter_name), \
                    edit_at(self.grun_model, positions=inputs["edit_pos"][nf:]):  # earlier adapters still edit
                model(input_ids=ids[nf:], attention_mask=mask[nf:], use_cache=False)
            base_hidden = self._captured.detach()
        keys = [("f", int(i)) for i in inputs["forget_index"]] + [("r", int(j)) for j in inputs["retain_index"]]
        out = None
        if cfg.method == "rmu":
            skipping = contextlib.nullcontext()
            cache = self.lower_cache
            if cache is not None and cache.enabled:
                hidden = cache.fetch(keys, ids, mask)
                if cache.enabled:
                    skipping = cache.skipping(hidden)
            with skipping:
                out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        else:
            # one process: the unwrapped model's backbone + LM head at answer tokens (+ cached prefix);
            # several: through the DDP wrapper (its forward arms the gradient all-reduce), full logits
            single = world == 1 and model is self.grun_model
            from_row = nf if cfg.retain_kl else None
            if from_row is not None:   # the frozen model's distributions (earlier adapters edit); first, so
                with torch.no_grad(), disable_adapters(self.grun_model, cfg.adapter_name):  # last_gate is ours
                    reference_log_probs = batch_answer_nll(
                        self.grun_model, ids[nf:], mask[nf:], labels[nf:], inputs["edit_pos"][nf:],
                        answer_head=single and self.answer_head, call=model, log_probs_from=0).log_probs
            nll, answer_tokens, log_probs = batch_answer_nll(
                self.grun_model, ids, mask, labels, inputs["edit_pos"], keys=keys, lower_cache=self.lower_cache,
                answer_head=single and self.answer_head, prefix_cache=self.prefix_cache if single else None,
                call=model, log_probs_from=from_row)
        modules = adapter_modules(self.grun_model, cfg.adapter_name)
        gates = [m.last_gate for m in modules.values()]
        # the forget rows that train the gate (suffix rows may train the edit only)
        gated = (None if self.gate_rows is None
                 else self.gate_rows.to(ids.device)[inputs["forget_index"].to(ids.device)])
        if cfg.positions == "all":
            # Gates per token. Forget rows: from the last prompt token on (the earlier prompt tokens, "Question:"
            # and the like, are shared with retain rows and cannot know yet what the row is about; pushing them
            # to 1 taught the gate a bias that opened it on retain questions: tiny TOFU forget01, NPO, 150 steps,
            # retain gate 0.18, retain ROUGE-L 0.914 -> 0.782). Retain rows: every real token -> 0.
            span = answer_span_mask(mask[:nf], inputs["edit_pos"][:nf])
            if gated is not None:
                span = span & gated[:, None]
            gf = [g[:nf][span] for g in gates]
            gr = [g[nf:][mask[nf:].bool()] for g in gates]
        else:
            keep = slice(None) if gated is None else gated
            gf, gr = [g[:nf][keep] for g in gates], [g[nf:] for g in gates]

        if cfg.method == "rmu":
            span = answer_span_mask(mask, inputs["edit_pos"])
            counts = self._global_sum(torch.stack([span[:nf].sum(), span[nf:].sum()]).float())
            h = self._captured
            # local token means reweighted to the global batch (the DDP mean over processes is its mean)
            target = self.rmu_target.to(h.device)
            forget = rmu_forget_loss(h[:nf], target, span[:nf]) * span[:nf].sum() / counts[0] * world
            retain = rmu_retain_loss(h[nf:], base_hidden, span[nf:]) * span[nf:].sum() / counts[1] * world
        else:
            counts = self._global_sum(torch.stack([(labels[:nf, 1:] != IGNORE_INDEX).sum(),
                                                   (labels[nf:, 1:] != IGNORE_INDEX).sum()]).float())
            denom = counts / world   # local sums over the global count per process: DDP's mean = the global mean
            r_ref = self.retain_reference.to(nll.device)[inputs["retain_index"].to(nll.device)]
            retain = retain_loss_from_nll(nll[nf:], r_ref, denom[1])
            if cfg.retain_kl:
                kl = retain_kl_loss(log_probs, reference_log_probs, denom[1])
            if cfg.method == "gd":
                forget = gd_forget_loss_from_nll(nll[:nf], denom[0])
            elif cfg.method == "idk":
                forget = idk_forget_loss_from_nll(nll[:nf], denom[0])
            elif cfg.method == "simnpo":   # a per-row mean over the local rows; DDP averages over processes
                forget = simnpo_loss(nll[:nf], answer_tokens[:nf], cfg.beta)
            else:  # npo
                s_ref = self.reference.to(nll.device)[inputs["forget_index"].to(nll.device)]
                forget = npo_loss(nll[:nf], s_ref, cfg.beta)
        gate = gate_bce(gf, gr)
        if cfg.positions == "all" and world > 1:
            # a mean over this process's gate values, whose number (tokens) differs between processes: weighted
            # so that DDP's average over processes is the mean over all of them, as in one process
            n_local = torch.stack([torch.tensor(float(sum(v.numel() for v in gf + gr)), device=gate.device)])
            gate = gate * (n_local / self._global_sum(n_local) * world)[0]
        loss = total_loss(forget, retain, gate, cfg.lambda_r, cfg.lambda_g, cfg.forget_scale, kl, cfg.retain_kl)

        bad = self._global_sum((~torch.isfinite(loss.detach())).float())
        if bad.item() > 0:
            last = self._last_checkpoint()
            raise TrainingDiverged(
                f"the loss became {loss.item()} at step {self.state.global_step + 1} (forget {forget.item():.4g}, "
                f"retain {retain.item():.4g}, gate {gate.item():.4g}); stopped before applying it. "
                + (f"Last good checkpoint: {last}" if last else "No checkpoint was written (set save_steps).")
                + " Try a lower lr or forget_scale.")
        with torch.no_grad():
            parts = {"forget_loss": forget, "retain_loss": retain, "gate_loss": gate,
                     **({"retain_kl": kl} if cfg.retain_kl else {}),
                     **({} if cfg.method == "rmu" else {"forget_nll": mean_nll(nll[:nf], answer_tokens[:nf].sum())}),
                     "gate_forget": torch.cat([g.reshape(-1) for g in gf]).float().mean(),
                     "gate_retain": torch.cat([g.reshape(-1) for g in gr]).float().mean()}
            for k, v in parts.items():
                if v.isfinite():   # gate_forget of a batch whose forget rows are all out of the gate loss: nan
                    self._sums[k], self._counts[k] = self._sums.get(k, 0.0) + float(v), self._counts.get(k, 0) + 1
        return (loss, out) if return_outputs else loss

    def _last_checkpoint(self) -> str | None:
        folder = self.args.output_dir
        return get_last_checkpoint(folder) if self.grun_config.save_steps and os.path.isdir(folder) else None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._counts and "loss" in logs:
            # mean over the steps since the last log and over processes (each term is already scaled so
            # that the mean over processes is the global-batch value); fixed names: one all-reduce shape everywhere
            sums = self._global_sum(torch.tensor([[self._sums.get(k, 0.0), self._counts.get(k, 0)] for k in LOGGED],
                                                 dtype=torch.float64, device=self.args.device))
            logs = {**logs, **{k: round(float(t / n), 5) for k, (t, n) in zip(LOGGED, sums.tolist()) if n}}
            self._sums, self._counts = {}, {}
        super().log(logs, start_time)

    # -- checkpoints: the adapter only (a checkpoint folder is itself a loadable adapter)
    def _save(self, output_dir: str | None = None, state_dict=None, adapter: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        save_adapter(self.grun_model, output_dir, self.grun_config.adapter_name, prompt_format=self.prompt_format,
                     tensors=adapter)
        write_text(self.grun_config.to_json(), Path(output_dir) / CONFIG_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        config, tensors = read_adapter_for(self.grun_model, resume_from_checkpoint)
        ours = adapter_modules(self.grun_model, self.grun_config.adapter_name)
        if sorted(config.layers) != sorted(ours) or config.rank != next(iter(ours.values())).rank:
            raise GRUNError(f"checkpoint {resume_from_checkpoint} holds an adapter for layers {config.layers}, "
                            f"rank {config.rank}; this run trains layers {sorted(ours)}")
        if self.is_fsdp_enabled:  # the parameters are FSDP shards: place the saved tensors like them
            tensors = placed_like(ours, tensors)
        load_adapter_weights(self.grun_model, tensors, self.grun_config.adapter_name)
