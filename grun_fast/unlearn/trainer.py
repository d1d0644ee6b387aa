"""``unlearn()``: one GRUN training run on the Hugging Face ``Trainer`` (``hf_trainer.GRUNTrainer``; so accelerate / torchrun DDP work unchanged, and FSDP through
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
from torch import nn
from transformers import TrainingArguments

from grun_fast.architectures import locate
from grun_fast.data.collate import ForgetSchedule, PairedCollator
from grun_fast.data.encoding import encode_rows, pad_token_id_of
from grun_fast.data.loading import validate_rows
from grun_fast.data.prompts import format_variants, resolve_template, row_prompt
from grun_fast.data.refusals import with_refusals
from grun_fast.data.suffixes import with_answer_suffixes
from grun_fast.errors import GRUNError
from grun_fast.evaluation.report import write_text
from grun_fast.patching import (adapter_modules, adapter_names, adapter_tensors, patch, save_adapter,
                                set_gate_threshold, unpatch)
from grun_fast.unlearn.config import ADDED_FIELDS, UnlearnConfig
from grun_fast.unlearn.hf_trainer import CONFIG_NAME, GRUNTrainer, reference_nll

LOG_NAME = "training_log.json"
CHECKPOINTS = "checkpoints"


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
    config = config.for_model(int(model.config.hidden_size)).for_data(len(forget_rows))
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
        saved = {**ADDED_FIELDS, **json.loads((Path(resume_from) / CONFIG_NAME).read_text())}
        ignore = {"progress", "save_steps", "logging_steps", "cache_lower_mb", "cache_prefix", "reference_batch_size",
                  "gradient_checkpointing"}
        if not config.answer_suffixes:   # no suffix rows: whether they train the gate changes nothing
            ignore.add("suffix_gate")
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
        n_whole = len(forget_rows)
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
    gate_rows = None   # suffix rows out of the gate loss: a flag per example of schedule.all_examples
    if not config.suffix_gate and len(forget_ex) > n_whole:
        gate_rows = (torch.arange(len(forget_ex)) < n_whole).repeat(len(forget_vars))

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
                              prompt_format=prompt_format, gate_rows=gate_rows)
        trainer.train(resume_from_checkpoint=resume_from)
        trainer.accelerator.wait_for_everyone()
        seconds = time.perf_counter() - t0
        if config.deploy_threshold is not None:
            set_gate_threshold(model, config.deploy_threshold, config.adapter_name)
        # FSDP: every process gathers the sharded adapter (a collective); one writes it
        gathered = adapter_tensors(model, config.adapter_name) if out is not None and trainer.is_fsdp_enabled else None
        if out is not None and trainer.args.should_save:
            save_adapter(model, out, config.adapter_name, prompt_format=prompt_format, tensors=gathered)
            write_text(config.to_json(), out / CONFIG_NAME)
            write_text(json.dumps(trainer.state.log_history, indent=1) + "\n", out / LOG_NAME)
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
