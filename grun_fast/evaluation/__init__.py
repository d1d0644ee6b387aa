"""Evaluation: the TOFU protocol (probability, ROUGE-L, truth ratio, forget quality, model utility, gates),
multiple choice (WMDP/MMLU), and report writers (JSON, Markdown, PNG)."""
from grun_fast.evaluation.external import EditAtPromptEnd, prompt_end_positions
from grun_fast.evaluation.multiple_choice import evaluate_multiple_choice, load_mc_file
from grun_fast.evaluation.report import (
    comparison_markdown,
    load_run,
    plot_splits,
    plot_tradeoff,
    summary_markdown,
    write_json,
    write_run,
)
from grun_fast.evaluation.splits import split_kind, tofu_eval_splits, validate_split
from grun_fast.evaluation.tofu import evaluate, forget_truth_ratios

__all__ = [
    "EditAtPromptEnd",
    "comparison_markdown",
    "evaluate",
    "evaluate_multiple_choice",
    "forget_truth_ratios",
    "load_mc_file",
    "load_run",
    "plot_splits",
    "plot_tradeoff",
    "prompt_end_positions",
    "split_kind",
    "summary_markdown",
    "tofu_eval_splits",
    "validate_split",
    "write_json",
    "write_run",
]
