"""Evaluate a model (+ GRUN adapters) with the TOFU protocol; writes eval.json, summary.md and eval.png.

    grun-fast eval --model PATH [--adapter DIR ...] --data DIR|locuslab/TOFU --split forget10 \\
        [--retain-eval FILE | --retain-model PATH] [--mc FILE ...] --out DIR

Everything that can be checked without the model (data files and fields, the adapter against the model's
config, the retain evaluation) is checked first, so a mistake costs seconds. With an adapter the model is
evaluated twice, without it (the baseline) and with it, unless --no-baseline.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Any

from grun_fast.data.prompts import ENCODINGS
from grun_fast.errors import GRUNError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grun_fast.models import MODEL_HELP

    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="GRUN adapter folder; repeat to stack several (applied in the order given)")
    parser.add_argument("--data", default=None,
                        help="TOFU folder or 'locuslab/TOFU' (default: $GRUN_TOFU_DIR)")
    parser.add_argument("--split", default="forget10", help="forget split: forget01, forget05 or forget10")
    parser.add_argument("--no-utility", action="store_true",
                        help="skip the utility splits (retain, real_authors, world_facts): no model utility")
    retain = parser.add_mutually_exclusive_group()
    retain.add_argument("--retain-eval", metavar="FILE",
                        help="eval.json of a retain model on the same forget split (gives forget quality)")
    retain.add_argument("--retain-model", metavar="PATH",
                        help="retain model to evaluate on the forget split (gives forget quality; its "
                             "evaluation is saved as OUT/retain_eval.json for reuse)")
    parser.add_argument("--mc", action="append", default=[], metavar="FILE",
                        help="multiple-choice JSONL (question, choices, answer), e.g. WMDP; repeatable")
    parser.add_argument("--holdout", metavar="FILE|SPLIT", default=None,
                        help="rows never trained on (question, answer; a JSONL/JSON/CSV file, or a TOFU split such "
                             "as holdout01 read from --data): adds the Min-K%%/Min-K%%++ membership AUC and "
                             "privleak on the forget split (against the retain model's AUC when --retain-eval or "
                             "--retain-model was run with the same holdout)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--label", default=None, help="name of this run in reports (default: the --out folder name)")
    parser.add_argument("--max-rows", type=int, default=None, help="evaluate only the first N rows of each split")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=200,
                        help="greedy generation length cap (200: open-unlearning's)")
    parser.add_argument("--max-length", type=int, default=512, help="longest prompt+answer scored, in tokens")
    parser.add_argument("--template", default=None,
                        help="prompt format: auto, plain, chat or a format string with one {question} (\\n read as "
                             "a newline); default: the format the adapter was trained with (its "
                             "adapter_config.json), else auto (the chat template if the tokenizer has one, else "
                             "plain)")
    parser.add_argument("--encoding", default="grun", choices=ENCODINGS,
                        help="how prompt + answer become token ids: grun (the exact prompt/answer boundary "
                             "training uses) or open-unlearning (its evaluator's: prompt + answer tokenised in one "
                             "call, labelled from the prompt's length; numbers comparable with its own)")
    parser.add_argument("--no-format-gates", action="store_true",
                        help="with --adapter: skip the mean gate per prompt-format variant (trailing space/newline "
                             "or none, chat with/without system prompt, bare question)")
    parser.add_argument("--no-baseline", action="store_true", help="with --adapter: skip the no-adapter baseline")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="model weights dtype (auto: bfloat16 on a GPU that supports it, else float32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_adapters(model_path: str, adapters: list[str]) -> list[str | None]:
    """Each adapter must fit the model's config (hidden size, layers, type): checked from the files alone.
    Returns each adapter's recorded prompt format (None where it has none)."""
    if not adapters:
        return []
    formats = []
    from grun_fast.adapters import read_adapter

    from grun_fast.models import load_config

    config = load_config(model_path)
    config = getattr(config, "text_config", None) or config
    hidden, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    for path in adapters:
        meta, _ = read_adapter(path)
        for key, have in (("hidden_size", hidden), ("num_layers", layers), ("model_type", config.model_type)):
            if meta.get(key) is not None and have is not None and meta[key] != have:
                raise GRUNError(f"adapter {path} was made for a model with {key} {meta[key]!r}; {model_path} has "
                                f"{have!r} (an adapter for another model?)")
        if layers is not None:
            meta["config"].resolve_layers(int(layers))
        formats.append(meta.get("prompt_format"))
    return formats


def resolve_eval_template(explicit: str | None, adapter_formats: list[str | None]) -> str:
    """``--template`` when given; else the format the adapters were trained with; else ``auto``."""
    from grun_fast.data.prompts import check_template, parse_template_arg

    if explicit is not None:
        return parse_template_arg(explicit)
    recorded = sorted({f for f in adapter_formats if f is not None})
    if len(recorded) > 1:
        raise GRUNError(f"the adapters were trained with different prompt formats ({', '.join(map(repr, recorded))}); "
                        "choose one with --template")
    return check_template(recorded[0]) if recorded else "auto"


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    from grun_fast.evaluation.multiple_choice import load_mc_file
    from grun_fast.evaluation.splits import tofu_eval_splits
    from grun_fast.evaluation.tofu import forget_truth_ratios

    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise GRUNError(f"--{name.replace('_', '-')} must be >= 1")
    from grun_fast.models import check_model

    check_model(args.model)
    if args.retain_model:
        check_model(args.retain_model)
    for path in args.adapter:
        if not Path(path).is_dir():
            raise GRUNError(f"adapter folder not found: {path}")
    splits = tofu_eval_splits(args.data, args.split, args.max_rows, utility=not args.no_utility)
    retain_ratios = None
    if args.retain_eval:
        questions = [r["question"] for r in splits[args.split]]
        retain_ratios = forget_truth_ratios(args.retain_eval, args.split, questions)
    mc = {Path(p).stem: load_mc_file(p, args.max_rows) for p in args.mc}
    if len(mc) != len(args.mc):
        raise GRUNError("two --mc files share a file name; rename one")
    args.template = resolve_eval_template(args.template, _check_adapters(args.model, args.adapter))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise GRUNError(f"--out {out} exists and is not a folder")
    _prepare_holdout(args)
    return {"splits": splits, "retain_ratios": retain_ratios, "mc": mc, "out": out}


def _prepare_holdout(args: argparse.Namespace) -> None:
    """``args.holdout_rows`` (--holdout) and ``args.retain_mia_auc`` (from --retain-eval, when it has one)."""
    from grun_fast.data.loading import load_rows
    from grun_fast.evaluation.tofu import forget_mia_auc

    args.holdout_rows, args.retain_mia_auc = None, None
    if getattr(args, "holdout", None) is None:
        return
    try:
        args.holdout_rows = load_rows(args.holdout, args.data)
    except (FileNotFoundError, ValueError) as e:
        raise GRUNError(f"--holdout {args.holdout}: {e}") from None
    if args.max_rows:
        args.holdout_rows = args.holdout_rows[:args.max_rows]
    if args.retain_eval:
        try:
            args.retain_mia_auc = forget_mia_auc(args.retain_eval, args.split)
        except GRUNError as e:
            print(f"grun-fast eval: warning: {e}; privleak uses the default reference AUC 0.5", file=sys.stderr)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(path: str, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode on ``device``, tokenizer) from a folder, hub name, .gguf file or short name."""
    import torch

    from grun_fast.models import load_model as _load

    device = resolve_device(device)
    if dtype == "auto":
        use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if use_bf16 else "float32"
    return _load(path, dtype=dtype, device=device)


def _eval_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch_size": args.batch_size, "template": args.template, "encoding": args.encoding,
            "max_new_tokens": args.max_new_tokens,
            "max_length": args.max_length, "progress": not args.quiet,
            "holdout": getattr(args, "holdout_rows", None), "retain_mia_auc": getattr(args, "retain_mia_auc", None)}


def _meta(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    from grun_fast.version import __version__

    return {"label": args.label or Path(args.out).resolve().name, "model": args.model, "adapters": args.adapter,
            "data": args.data, "split": args.split, "max_rows": args.max_rows,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "grun_fast": __version__, **extra}


def _evaluate_all(model, tokenizer, plan: dict, args: argparse.Namespace, retain_ratios) -> dict[str, Any]:
    import grun_fast
    from grun_fast.evaluation.multiple_choice import evaluate_multiple_choice
    from grun_fast.evaluation.tofu import evaluate

    result = evaluate(model, tokenizer, plan["splits"], retain_truth_ratios=retain_ratios, **_eval_kwargs(args))
    if args.adapter and grun_fast.adapter_names(model, enabled_only=True) and not args.no_format_gates:
        from grun_fast.evaluation.formats import format_gates

        result["format_gates"] = format_gates(model, tokenizer, plan["splits"], args.template,
                                              batch_size=args.batch_size)
    if plan["mc"]:
        result["multiple_choice"] = {
            name: evaluate_multiple_choice(model, tokenizer, rows, batch_size=args.batch_size, progress=not args.quiet)
            for name, rows in plan["mc"].items()}
    return result


def run(args: argparse.Namespace) -> int:
    import grun_fast
    from grun_fast.evaluation.report import summary_markdown, write_json, write_run, write_text
    from grun_fast.evaluation.tofu import evaluate

    try:
        plan = _prepare(args)
        retain_ratios = plan["retain_ratios"]
        if args.retain_model:
            print(f"evaluating the retain model {args.retain_model} on {args.split}", file=sys.stderr)
            retain, retain_tok = load_model(args.retain_model, args.device, args.dtype)
            retain_result = evaluate(retain, retain_tok, {args.split: plan["splits"][args.split]},
                                     **_eval_kwargs(args))
            del retain
            write_json({"meta": _meta(args, label="retain model", model=args.retain_model, adapters=[]),
                        "metrics": retain_result, "baseline": None}, plan["out"] / "retain_eval.json")
            retain_ratios = [r["truth_ratio"] for r in retain_result["splits"][args.split]["rows"]]
            if retain_result.get("privleak"):
                from grun_fast.evaluation.tofu import forget_mia_auc

                args.retain_mia_auc = forget_mia_auc(retain_result, args.split)

        model, tokenizer = load_model(args.model, args.device, args.dtype)
        baseline = None
        if args.adapter and not args.no_baseline:
            print("evaluating the model without adapters (baseline)", file=sys.stderr)
            baseline = _evaluate_all(model, tokenizer, plan, args, retain_ratios)
        for i, path in enumerate(args.adapter):
            grun_fast.patch(model, path, name="default" if len(args.adapter) == 1 else f"adapter{i}")
        if args.adapter:
            print(f"evaluating with adapters {', '.join(grun_fast.adapter_names(model))}", file=sys.stderr)
        metrics = _evaluate_all(model, tokenizer, plan, args, retain_ratios)
    except GRUNError as e:
        print(f"grun-fast eval: error: {e}", file=sys.stderr)
        return 2
    run_data = {"meta": _meta(args), "metrics": metrics, "baseline": baseline}
    paths = write_run(run_data, plan["out"])
    summary = summary_markdown(run_data)
    if metrics.get("format_gates"):
        from grun_fast.evaluation.formats import format_gates_markdown

        summary += "\n" + format_gates_markdown(metrics["format_gates"])
        write_text(summary, paths["markdown"])
    print(summary)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0
