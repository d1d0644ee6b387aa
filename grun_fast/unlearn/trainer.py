"""GRUN training on the Hugging Face ``Trainer`` (so accelerate / torchrun DDP work unchanged, and FSDP through
accelerate's plugin: ``configs/accelerate_fsdp.yaml``; under FSDP the adapter is gathered from its shards to
be saved, and only it and the sharded optimizer state go into checkpoints).

One optimiser step = ``batch_size`` forget rows, each paired with a retain row, run as ONE forward of the
frozen model with the adapter editing each row's last prompt token. Only the adapter's parameters train;
the base model (and any adapter patched earlier, for sequential unlearning) stays frozen.

Reproducibility: the forget order and the retain pairing are functions of (seed, position in the run)
(``grun_fast.data.collate``), token means are taken over the whole global batch, and the adapter is
initialised from the seed, so a resumed run and a run split over several processes reproduce the
uninterrupted single-process run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from grun_fast.adapters import read_adapter_for
from grun_fast.architectures import locate
from grun_fast.data.collate import ForgetSchedule, PairedCollator
from grun_fast.data.encoding import IGNORE_INDEX, encode_rows, pad_examples, pad_token_id_of
from grun_fast.data.loading import validate_rows
from grun_fast.data.prompts import format_variants, resolve_template, row_prompt
from grun_fast.data.refusals import with_refusals
from grun_fast.data.suffixes import with_answer_suffixes
from grun_fast.errors import GRUNError
from grun_fast.patching import (adapter_config, adapter_modules, adapter_names, adapter_tensors, disable_adapters,
                                edit_at, load_adapter_weights, patch, save_adapter, unpatch)
from grun_fast.unlearn.cache import LowerLayerCache
from grun_fast.unlearn.config import UnlearnConfig
from grun_fast.unlearn.fsdp import FSDPAdapterMixin, placed_like
from grun_fast.unlearn.losses import (answer_nll, gate_bce, gd_forget_loss_from_nll, idk_forget_loss_from_nll,
                                      npo_loss, retain_loss_from_nll, simnpo_loss, rmu_control_vector, rmu_forget_loss,
                                      rmu_retain_loss, total_loss)
from grun_fast.unlearn.step import PrefixCache, batch_answer_nll

CONFIG_NAME = "unlearn_config.json"
LOG_NAME = "training_log.json"
CHECKPOINTS = "checkpoints"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped before applying that step."""


@dataclass
class UnlearnResult:
    """What ``unlearn`` hands back: the model (patched in place with the new adapter) and the run's record."""

    model: nn.Module
    adapter_name: str
    config: UnlearnConfig
    log_history: list[dict] = field(default_factory=list)
    global_step: int = 0
    train_seconds: float = 0.0
    out: Path | None = None


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
                 pad_token_id: int = 0, prompt_format: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prompt_format = prompt_format    # the resolved prompt format, recorded in adapter_config.json
        self.grun_model = grun_model          # the unwrapped model that carries the patch state
        self.grun_config = grun_config
        self.reference = reference            # NPO: S_ref per forget row
        self.retain_reference = retain_reference  # the frozen model's summed NLL per retain example
        if retain_reference is None and grun_config.method != "rmu":
            raise ValueError("GRUNTrainer needs retain_reference (the frozen model's NLL per retain example) for "
                             f"method {grun_config.method!r}")
        self.pad_token_id = pad_token_id
        self.loss_is_scaled_for_ga = False
        self._sums: dict[str, float] = {}
        self._count = 0
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
            nll, answer_tokens = batch_answer_nll(self.grun_model, ids, mask, labels, inputs["edit_pos"], keys=keys,
                                      lower_cache=self.lower_cache, answer_head=single and self.answer_head,
                                      prefix_cache=self.prefix_cache if single else None, call=model)
        modules = adapter_modules(self.grun_model, cfg.adapter_name)
        gates = [m.last_gate for m in modules.values()]
        if cfg.positions == "all":
            # Gates per token. Forget rows: from the last prompt token on (the earlier prompt tokens, "Question:"
            # and the like, are shared with retain rows and cannot know yet what the row is about; pushing them
            # to 1 taught the gate a bias that opened it on retain questions: tiny TOFU forget01, NPO, 150 steps,
            # retain gate 0.18, retain ROUGE-L 0.914 -> 0.782). Retain rows: every real token -> 0.
            span = answer_span_mask(mask[:nf], inputs["edit_pos"][:nf])
            gf = [g[:nf][span] for g in gates]
            gr = [g[nf:][mask[nf:].bool()] for g in gates]
        else:
            gf, gr = [g[:nf] for g in gates], [g[nf:] for g in gates]

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
        loss = total_loss(forget, retain, gate, cfg.lambda_r, cfg.lambda_g, cfg.forget_scale)

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
                     "gate_forget": torch.cat([g.reshape(-1) for g in gf]).float().mean(),
                     "gate_retain": torch.cat([g.reshape(-1) for g in gr]).float().mean()}
            for k, v in parts.items():
                self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._count += 1
        return (loss, out) if return_outputs else loss

    def _last_checkpoint(self) -> str | None:
        folder = self.args.output_dir
        return get_last_checkpoint(folder) if self.grun_config.save_steps and os.path.isdir(folder) else None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._count and "loss" in logs:
            names = sorted(self._sums)
            # mean over the steps since the last log and over processes (each term is already scaled so
            # that the mean over processes is the global-batch value)
            means = self._global_sum(torch.tensor([self._sums[k] / self._count for k in names], dtype=torch.float64,
                                                  device=self.args.device)) / self.accelerator.num_processes
            logs = {**logs, **{k: round(float(v), 5) for k, v in zip(names, means)}}
            self._sums, self._count = {}, 0
        super().log(logs, start_time)

    # -- checkpoints: the adapter only (a checkpoint folder is itself a loadable adapter)
    def _save(self, output_dir: str | None = None, state_dict=None, adapter: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        save_adapter(self.grun_model, output_dir, self.grun_config.adapter_name, prompt_format=self.prompt_format,
                     tensors=adapter)
        _write_text(Path(output_dir) / CONFIG_NAME, self.grun_config.to_json())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        config, tensors = read_adapter_for(self.grun_model, resume_from_checkpoint)
        ours = adapter_modules(self.grun_model, self.grun_config.adapter_name)
        if sorted(config.layers) != sorted(ours) or config.rank != next(iter(ours.values())).rank:
            raise GRUNError(f"checkpoint {resume_from_checkpoint} holds an adapter for layers {config.layers}, "
                            f"rank {config.rank}; this run trains layers {sorted(ours)}")
        if self.is_fsdp_enabled:  # the parameters are FSDP shards: place the saved tensors like them
            tensors = placed_like(ours, tensors)
        load_adapter_weights(self.grun_model, tensors, self.grun_config.adapter_name)


# ----------------------------------------------------------------------------------------------- API
def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise GRUNError(f"output folder {out}: {probe} exists and is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise GRUNError(f"output folder {out} is not writable ({probe} does not allow writing)")


def _placement(model: nn.Module) -> dict[tuple[nn.Module, str, str], torch.device]:
    """The device of every parameter and buffer, by (owning module, kind, name)."""
    return {(m, kind, name): t.device for m in model.modules()
            for kind in ("_parameters", "_buffers") for name, t in getattr(m, kind).items() if t is not None}


def _restore_placement(model: nn.Module, placement: Mapping[tuple[nn.Module, str, str], torch.device]) -> None:
    """Move every parameter and buffer recorded by ``_placement`` back to its device."""
    devices = set(placement.values())
    if len(devices) == 1:
        model.to(next(iter(devices)))
        return
    with torch.no_grad():
        for (m, kind, name), device in placement.items():
            t = getattr(m, kind).get(name)
            if t is not None and t.device != device:
                if kind == "_parameters":
                    t.data = t.data.to(device)
                else:
                    m._buffers[name] = t.to(device)


def training_formats(prompt_format: str, tokenizer: Any, augment: bool, rows: Sequence[Mapping]) -> list[str]:
    """The prompt formats training rows are encoded in: the resolved format first, then (``augment``) its
    variants (``prompts.format_variants``). Document rows (a ``prompt`` key) look the same in every format,
    so a run of documents only is not augmented."""
    if not augment or all("prompt" in row for row in rows):
        return [prompt_format]
    return list(format_variants(prompt_format, tokenizer).values())


def _row_key(row: Mapping[str, Any]) -> tuple[str, str]:
    return (row_prompt(row), row["answer"])


def check_rows(forget_rows: Sequence[Mapping], retain_rows: Sequence[Mapping]) -> tuple[list[dict], list[dict]]:
    """Validate both sets and their overlap (all before any work)."""
    try:
        forget = validate_rows(forget_rows, "forget set")
        retain = validate_rows(retain_rows, "retain set")
    except ValueError as e:
        raise GRUNError(str(e)) from None
    retain_keys = {_row_key(r) for r in retain}
    shared = sum(_row_key(r) in retain_keys for r in forget)
    if shared == len(forget):
        raise GRUNError(f"every forget row ({shared}) is also in the retain set: the objective would ask the model "
                        "to forget and keep the same answers. Remove the forget rows from the retain set")
    if shared:
        warnings.warn(f"{shared} of {len(forget)} forget rows also appear in the retain set", stacklevel=3)
    return forget, retain


def _incomplete(checkpoint: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None if it can). The Trainer writes trainer_state.json
    last, so a run killed while checkpointing leaves a folder without it (or with it cut short)."""
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json"):
        if not (checkpoint / name).is_file():
            return f"it has no {name}"
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "its trainer_state.json is cut short"
    return None


def _resolve_resume(resume: bool | str | os.PathLike | None, ckpt_dir: Path | None) -> str | None:
    """The checkpoint to resume from: with resume=True the newest complete one (a run killed mid-checkpoint
    leaves an incomplete newest folder, which is skipped with a warning)."""
    if not resume:
        return None
    if resume is True:
        found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                       key=lambda p: int(p.name.split("-")[-1]), reverse=True) if ckpt_dir is not None and ckpt_dir.is_dir() else []
        for checkpoint in found:
            reason = _incomplete(checkpoint)
            if reason is None:
                return str(checkpoint)
            warnings.warn(f"skipping checkpoint {checkpoint}: {reason} (the run stopped while writing it)", stacklevel=3)
        raise GRUNError(f"resume=True but there is no complete checkpoint under {ckpt_dir}")
    path = Path(resume)
    if not path.is_dir():
        raise GRUNError(f"checkpoint to resume from not found: {path}")
    reason = _incomplete(path)
    if reason is not None:
        raise GRUNError(f"cannot resume from {path}: {reason}")
    return str(path)


def unlearn(model: nn.Module, tokenizer: Any, forget_rows: Sequence[Mapping], retain_rows: Sequence[Mapping],
            method: str | None = None, layers: Sequence[int] | None = None, *, out: str | os.PathLike | None = None,
            config: UnlearnConfig | None = None, resume: bool | str | os.PathLike | None = None,
            **overrides: Any) -> UnlearnResult:
    """Train a GRUN adapter that makes ``model`` forget ``forget_rows`` while keeping ``retain_rows``.

    The model is patched in place with a new adapter (``config.adapter_name``); the base weights and any
    adapter already on the model stay frozen (a second request on an unlearned model = sequential
    unlearning). ``out``: folder for the final adapter (``adapter_config.json``, ``adapter_model.safetensors``,
    ``unlearn_config.json``, ``training_log.json``) and, with ``save_steps``, ``checkpoints/``.
    ``resume``: True (latest checkpoint under ``out``) or a checkpoint folder. Other keyword arguments
    override ``UnlearnConfig`` fields (lr=..., epochs=..., ...).

    The model trains on the Trainer's device (the first GPU, else the CPU) and stays there afterwards, with its
    train/eval flags as before. Bad input raises ``GRUNError`` before anything is touched; on any failure
    during training the new adapter is removed again and the model is left as it was, back on its original
    device(s) (checkpoints already written stay). Under FSDP (``accelerate launch --config_file
    configs/accelerate_fsdp.yaml``) the model comes back sharded, as the Trainer left it.
    """
    if config is None:
        if method is not None:
            overrides["method"] = method
        config = UnlearnConfig(layers=list(layers) if layers is not None else None, **overrides)
    elif overrides or method is not None or layers is not None:
        extra = dict(overrides)
        if method is not None:
            extra["method"] = method
        if layers is not None:
            extra["layers"] = list(layers)
        config = UnlearnConfig.from_dict({**config.to_dict(), **extra})
    # ---- validation: nothing is modified before all of it passes
    forget_rows, retain_rows = check_rows(forget_rows, retain_rows)
    _, decoder_layers = locate(model)
    num_layers = len(decoder_layers)
    grun_config = config.grun_config(num_layers)
    if config.adapter_name in adapter_names(model):
        raise GRUNError(f"the model already has an adapter named {config.adapter_name!r}; pick another "
                        "adapter_name for a new unlearning request")
    if config.method == "rmu" and config.rmu_layer is not None:
        r = config.rmu_layer + num_layers if config.rmu_layer < 0 else config.rmu_layer
        if not 0 <= r < num_layers:
            raise GRUNError(f"rmu_layer {config.rmu_layer} is out of range for {num_layers} decoder layers")
        if r < min(grun_config.layers):
            raise GRUNError(f"rmu_layer {config.rmu_layer} lies below every edited layer {grun_config.layers}: "
                            "the edit could not move it")
    try:
        pad_id = pad_token_id_of(tokenizer)
    except ValueError as e:
        raise GRUNError(str(e)) from None
    out = Path(out) if out is not None else None
    if out is not None:
        _check_writable(out)
    ckpt_dir = out / CHECKPOINTS if out is not None else None
    if config.save_steps and out is None:
        raise GRUNError("save_steps needs an output folder (out=...) for the checkpoints")
    resume_from = _resolve_resume(resume, ckpt_dir)
    if resume_from is not None and (Path(resume_from) / CONFIG_NAME).is_file():
        saved = json.loads((Path(resume_from) / CONFIG_NAME).read_text())
        ignore = {"progress", "save_steps", "logging_steps", "cache_lower_mb", "cache_prefix", "reference_batch_size",
                  "gradient_checkpointing"}
        diff = sorted(k for k in saved if k not in ignore and saved[k] != config.to_dict().get(k))
        if diff:
            raise GRUNError(f"checkpoint {resume_from} was trained with different settings ({', '.join(diff)}); "
                            "resume with the same configuration")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.batch_size % world:
        raise GRUNError(f"batch_size {config.batch_size} is not divisible by the {world} processes")

    # ---- data: every row encoded in the resolved format and, with augment_formats, in each of its variants
    prompt_format = resolve_template(config.template, tokenizer)
    formats = training_formats(prompt_format, tokenizer, config.augment_formats, forget_rows + retain_rows)
    try:
        if config.method == "idk":
            forget_rows = with_refusals(forget_rows, seed=config.seed)
        forget_rows = with_answer_suffixes(forget_rows, config.answer_suffixes, seed=config.seed)
        forget_vars = [encode_rows(tokenizer, forget_rows, f, config.max_length) for f in formats]
        retain_vars = [encode_rows(tokenizer, retain_rows, f, config.max_length) for f in formats]
    except ValueError as e:
        raise GRUNError(f"could not tokenise the data: {e}") from None
    forget_ex = forget_vars[0]
    steps = config.steps(len(forget_ex))
    schedule = ForgetSchedule(forget_ex, epochs=math.ceil(steps * config.batch_size / len(forget_ex)),
                              seed=config.seed, variants=forget_vars[1:])
    schedule.order = schedule.order[: steps * config.batch_size]
    collator = PairedCollator(retain_vars[0], pad_id, seed=config.seed, variants=retain_vars[1:])

    use_ckpt_dir = ckpt_dir is not None and bool(config.save_steps or resume_from)
    scratch = None if use_ckpt_dir else tempfile.mkdtemp(prefix="grun-unlearn-")
    args = TrainingArguments(
        output_dir=str(ckpt_dir) if use_ckpt_dir else scratch,
        per_device_train_batch_size=config.batch_size // world, max_steps=steps, num_train_epochs=1,
        learning_rate=config.lr, weight_decay=config.weight_decay, lr_scheduler_type="linear",
        warmup_steps=math.ceil(config.warmup_ratio * steps),  # whole steps: a float < 1 means a ratio only in v5
        max_grad_norm=config.max_grad_norm, logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no", save_steps=config.save_steps or 500,
        report_to="none", remove_unused_columns=False, seed=config.seed, data_seed=config.seed,
        disable_tqdm=not config.progress, dataloader_num_workers=0, dataloader_pin_memory=False,
        ddp_backend=("gloo" if not torch.cuda.is_available() else None) if world > 1 else None,
        use_cpu=world > 1 and not torch.cuda.is_available(),  # accelerate's multi-CPU (gloo) mode
        ddp_find_unused_parameters=False,
        logging_first_step=True)
    device = args.device
    if args.n_gpu > 1:  # one process, several GPUs: train on one (DataParallel would split the edit positions)
        args._n_gpu = 1

    # ---- training (the model is modified from here on; undone on failure)
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    modes = {m: m.training for m in model.modules()}
    placement = _placement(model)
    checkpointing = False
    trainer = None
    t0 = time.perf_counter()
    try:
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        reference = retain_reference = None
        if config.method == "npo":
            reference = reference_nll(model, schedule.all_examples, pad_id, config.reference_batch_size, device)
        if config.method != "rmu":
            retain_reference = reference_nll(model, collator.all_examples, pad_id, config.reference_batch_size,
                                             device)
        torch.manual_seed(config.seed)
        patch(model, grun_config, config.adapter_name)
        for p in (p for m in adapter_modules(model, config.adapter_name).values() for p in m.parameters()):
            p.requires_grad_(True)
        if config.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable(**({"activation_checkpointing_kwargs": {"use_reentrant": False}}
                      if enable.__name__ == "activation_checkpointing_enable"
                      else {"gradient_checkpointing_kwargs": {"use_reentrant": False}}))
            model.enable_input_require_grads()
            checkpointing = True
        trainer = GRUNTrainer(model=model, args=args, train_dataset=schedule, data_collator=collator,
                              grun_model=model, grun_config=config, reference=reference,
                              retain_reference=retain_reference, pad_token_id=pad_id,
                              prompt_format=prompt_format)
        trainer.train(resume_from_checkpoint=resume_from)
        trainer.accelerator.wait_for_everyone()
        seconds = time.perf_counter() - t0
        # FSDP: every process gathers the sharded adapter (a collective); one writes it
        gathered = adapter_tensors(model, config.adapter_name) if out is not None and trainer.is_fsdp_enabled else None
        if out is not None and trainer.args.should_save:
            save_adapter(model, out, config.adapter_name, prompt_format=prompt_format, tensors=gathered)
            _write_text(out / CONFIG_NAME, config.to_json())
            _write_text(out / LOG_NAME, json.dumps(trainer.state.log_history, indent=1) + "\n")
        trainer.accelerator.wait_for_everyone()
    except BaseException:
        if config.adapter_name in adapter_names(model):
            unpatch(model, config.adapter_name)
        _restore_placement(model, placement)
        raise
    finally:
        if trainer is not None:
            trainer.remove_hooks()
        for name in adapter_names(model):  # the last step's gates hold its autograd graph (memory; deepcopy)
            for module in adapter_modules(model, name).values():
                module.last_gate = None
        if checkpointing:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
            if hasattr(model, "disable_input_require_grads"):
                model.disable_input_require_grads()
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)
        for m, flag in modes.items():
            m.training = flag
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return UnlearnResult(model=model, adapter_name=config.adapter_name, config=config,
                         log_history=list(trainer.state.log_history), global_step=trainer.state.global_step,
                         train_seconds=seconds, out=out)
