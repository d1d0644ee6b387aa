"""train a GRUN adapter (gated GD, NPO, IDK or RMU) that makes a model forget a data set

Examples:
  grun-fast unlearn --model path/to/model --data ../shared/data/tofu --forget forget01 --method npo --out adapters/f01
  grun-fast unlearn --model m --forget secrets.jsonl --retain keep.jsonl --layers 20,25,31 --out adapters/s1
  grun-fast unlearn --model m --apply adapters/s1:first --forget more.jsonl --retain keep.jsonl \\
      --adapter-name second --out adapters/s2          # a second request on top of the first
Run under `torchrun --nproc_per_node N -m grun_fast.cli unlearn ...` for data-parallel training.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from grun_fast.data.prompts import parse_template_arg
from grun_fast.errors import GRUNError
from grun_fast.models import MODEL_HELP
from grun_fast.unlearn.config import DEFAULT_EPOCHS, DEFAULT_RANK, MIN_DEFAULT_STEPS, UnlearnConfig
from grun_fast.unlearn.losses import METHODS

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    d = UnlearnConfig()
    io = parser.add_argument_group("model and data")
    io.add_argument("--model", required=True, help=MODEL_HELP + "; its tokenizer too")
    io.add_argument("--tokenizer", help="tokenizer folder if not the model's")
    io.add_argument("--forget", required=True,
                    help="rows to forget: a .jsonl/.json/.csv file (question, answer), a .txt/.md document or "
                         "folder of them, or a TOFU split name (forget01, ...) looked up in --data")
    io.add_argument("--retain", action="append",
                    help="rows to keep: same forms (default for TOFU forgetNN: retain(100-NN)); repeat it to add "
                         "general text the gate must stay closed on, e.g. --retain retain95 --retain general.jsonl")
    io.add_argument("--data", help="TOFU folder or 'locuslab/TOFU' (default: $GRUN_TOFU_DIR)")
    io.add_argument("--chunk-words", type=int, default=128, help="document chunk length in words")
    io.add_argument("--prefix-words", type=int, default=16,
                    help="words of each document chunk used as the prompt (0: whole chunk is the answer)")
    io.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the model in")
    io.add_argument("--apply", action="append", default=[], metavar="DIR[:NAME]",
                    help="adapter(s) from earlier requests to apply (frozen) before training; repeatable")
    io.add_argument("--out", required=True, help="folder for the adapter (and checkpoints)")
    io.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    io.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                    help="resume from the latest checkpoint in --out (or from CHECKPOINT)")

    m = parser.add_argument_group("method")
    m.add_argument("--method", choices=METHODS, default=d.method, help="forget objective")
    m.add_argument("--layers", type=_layers, help="decoder layers to edit, e.g. 20,25,31 (default ~62/78/100%% depth)")
    m.add_argument("--rank", type=int,
                   help=f"rank of the edit (default: {DEFAULT_RANK}, or half the hidden size where smaller)")
    m.add_argument("--gate", choices=("linear", "mlp"), default=d.gate)
    m.add_argument("--positions", choices=("last_prompt", "all", "mask"), default=d.positions)
    m.add_argument("--adapter-name", default=d.adapter_name, help="name of the new adapter (stacking)")
    m.add_argument("--template", default=d.template,
                   help="prompt format: auto (default: the tokenizer's chat template if it has one, else plain), "
                        "plain ('Question: q\\nAnswer:' + ' ' + answer), chat, or a format string with one "
                        "{question}, e.g. 'Q: {question}\\nA:' (\\n and \\t are read as newline and tab)")
    m.add_argument("--no-format-augmentation", action="store_true",
                   help="train on the format itself only (default: each row's prompt drawn from its variants: "
                        "trailing space/newline or none, chat with/without system prompt, the bare question)")

    m.add_argument("--answer-suffixes", type=int, metavar="N",
                   help="per forget row, N extra rows whose answer starts at a later word, so that reworded "
                        "answers are suppressed too (default: 3 for npo and simnpo, else 0; not with --method idk)")
    m.add_argument("--suffix-gate", action="store_true",
                   help="train the gate on the suffix rows too (default: they train the edit only, the gate "
                        "learns from whole rows; gated suffixes opened it on more general answers)")

    h = parser.add_argument_group("training")
    h.add_argument("--epochs", type=int, default=d.epochs,
                   help=f"passes over the forget set (default: {DEFAULT_EPOCHS}, and at least {MIN_DEFAULT_STEPS} steps)")
    h.add_argument("--max-steps", type=int, help="optimiser steps (overrides --epochs)")
    h.add_argument("--batch-size", type=int, default=d.batch_size, help="forget rows per step, all processes")
    h.add_argument("--lr", type=float, default=d.lr)
    h.add_argument("--weight-decay", type=float, default=d.weight_decay, help="never applied to the rotation")
    h.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    h.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    h.add_argument("--lambda-r", type=float, help="retain weight (default per method)")
    h.add_argument("--lambda-g", type=float, default=d.lambda_g, help="gate BCE weight")
    h.add_argument("--retain-kl", type=float, default=d.retain_kl, metavar="W",
                   help="weight of a KL term holding the retain answers' whole next-token distributions at the "
                        "frozen model's (default 0: off; not with --method rmu)")
    h.add_argument("--gate-threshold", type=float, metavar="T",
                   help="train and deploy with a hard gate threshold: tokens whose gate is below T are not edited "
                        "(default: none, the soft gate)")
    h.add_argument("--deploy-threshold", type=float, metavar="T",
                   help="train with the soft gate, then save and return the adapter with hard gate threshold T "
                        "(not with --gate-threshold)")
    h.add_argument("--forget-scale", type=float, help="forget term multiplier (default: 10 for npo and simnpo, else 1)")
    h.add_argument("--beta", type=float, help="NPO/SimNPO temperature (default: 0.1 for npo; for simnpo 2 up to 40 forget "
                                                    "rows, 1 from 200 on, log-linear between)")
    h.add_argument("--rmu-coefficient", type=float, default=d.rmu_coefficient)
    h.add_argument("--rmu-layer", type=int)
    h.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example")
    h.add_argument("--seed", type=int, default=d.seed)
    h.add_argument("--save-steps", type=int, help="write a resumable checkpoint every N steps")
    h.add_argument("--logging-steps", type=int, default=d.logging_steps)
    h.add_argument("--gradient-checkpointing", action="store_true")
    h.add_argument("--no-progress", action="store_true", help="no progress bar")


def _default_retain(forget: str) -> str | None:
    match = re.fullmatch(r"forget(\d\d)", forget)
    return f"retain{100 - int(match.group(1)):02d}" if match else None


def _config(args: argparse.Namespace) -> UnlearnConfig:
    return UnlearnConfig(
        method=args.method, layers=args.layers, rank=args.rank, gate=args.gate, positions=args.positions,
        adapter_name=args.adapter_name, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, lambda_r=args.lambda_r, lambda_g=args.lambda_g,
        forget_scale=args.forget_scale, beta=args.beta, rmu_coefficient=args.rmu_coefficient,
        rmu_layer=args.rmu_layer, template=parse_template_arg(args.template),
        augment_formats=not args.no_format_augmentation, answer_suffixes=args.answer_suffixes,
        suffix_gate=args.suffix_gate, retain_kl=args.retain_kl, gate_threshold=args.gate_threshold,
        deploy_threshold=args.deploy_threshold,
        max_length=args.max_length, seed=args.seed,
        save_steps=args.save_steps, logging_steps=args.logging_steps,
        gradient_checkpointing=args.gradient_checkpointing, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except GRUNError as e:
        print(f"grun-fast unlearn: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from grun_fast.data.loading import load_rows
    from grun_fast.unlearn import TrainingDiverged, unlearn

    # everything that can be checked without loading the model, first
    config = _config(args)
    out = Path(args.out)
    if (out / "adapter_config.json").exists() and not (args.overwrite or args.resume):
        raise GRUNError(f"{out} already holds an adapter; pass --overwrite to replace it or choose another --out")
    applied = []
    for spec in args.apply:
        path, _, name = spec.partition(":")
        if not Path(path).is_dir():
            raise GRUNError(f"--apply {spec}: no adapter folder {path}")
        applied.append((path, name or Path(path).name))
    retain_specs = args.retain or [_default_retain(args.forget)]
    if retain_specs == [None]:
        raise GRUNError("--retain is required (rows the model must keep answering)")
    retain_spec = " + ".join(retain_specs)
    prefix = args.prefix_words or None
    try:
        forget = load_rows(args.forget, args.data, args.chunk_words, prefix)
        retain = [row for spec in retain_specs for row in load_rows(spec, args.data, args.chunk_words, prefix)]
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise GRUNError(str(e)) from None

    model, tokenizer = _load_model(args)
    import grun_fast

    for path, name in applied:
        grun_fast.patch(model, path, name=name)
    print(f"unlearning {len(forget)} rows ({args.forget}) keeping {len(retain)} ({retain_spec}) with gated "
          f"{config.method}", file=sys.stderr)
    try:
        result = unlearn(model, tokenizer, forget, retain, config=config, out=out, resume=args.resume)
    except TrainingDiverged as e:
        print(f"grun-fast unlearn: {e}", file=sys.stderr)
        return 3
    _end_distributed()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    last = next((h for h in reversed(result.log_history) if "forget_loss" in h), {})
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("forget_loss", "retain_loss", "gate_forget", "gate_retain")
                        if k in last)
    print(f"done: {result.global_step} steps in {result.train_seconds:.1f} s ({summary}); adapter "
          f"{config.adapter_name!r} written to {out}")
    return 0


def _end_distributed() -> None:
    """Under torchrun / accelerate launch: wait for every process, then tear the process group down while the
    interpreter is whole. Left to interpreter exit, Gloo's worker threads can still hold tensors and the process
    aborts now and then ("terminate called without an active exception", SIGABRT; pytorch#190489; seen once in
    the FSDP test on 2 CPU processes)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _load_model(args: argparse.Namespace):
    from grun_fast.models import load_model

    return load_model(args.model, dtype=args.dtype, device=None, tokenizer=args.tokenizer)
