"""One GRUN training step against its peers: full fine-tuning and LoRA (peft), same model, same rows.

The workload is the training benchmark's (bench/reference_stack/config.json: Llama d=512, 8 layers,
batch 8 forget + 8 retain of 96 tokens). Each variant does one optimiser step on the joint 16 rows:
- grun: the adapter at layers [4, 6, 7], gated GD (-NLL_f + 2 NLL_r + 10 BCE), base frozen;
- lora: peft LoRA r=8 on q/k/v/o of every layer, GD loss (-NLL_f + 2 NLL_r), base frozen;
- full: every weight trainable, the same GD loss.
Times alternate call by call in one process (median of rounds); peak memory is measured per variant in a
fresh subprocess (CPU: growth of the peak resident set during the steps; CUDA: max allocated).

    python -m bench.bench_training_peers [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from bench.bench_training_vs_reference import Ours, _llama, _timed, load_config, make_batches
from bench.common import append_rows, device_name, quantiles, today

VARIANTS = ("grun", "lora", "full")


class Peer:
    """Full fine-tuning or LoRA on the joint forget+retain rows with the GD loss (no gate)."""

    def __init__(self, cfg: dict, kind: str):
        model = _llama(cfg).train()
        if kind == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg["lr"], weight_decay=0.0)
        forget, retain = make_batches(cfg)
        self.batch = {k: torch.cat([forget[k], retain[k]]) for k in forget}
        self.n_forget = forget["input_ids"].shape[0]

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        batch, nf = self.batch, self.n_forget
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        target = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                                                reduction="none", ignore_index=-100).view_as(target)
        valid = (target != -100).float()
        nll_f = (nll[:nf] * valid[:nf]).sum() / valid[:nf].sum()
        nll_r = (nll[nf:] * valid[nf:]).sum() / valid[nf:].sum()
        (-nll_f + 2.0 * nll_r).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()


def build(kind: str, cfg: dict):
    return Ours(cfg, "joint") if kind == "grun" else Peer(cfg, kind)


def trainable(variant) -> int:
    return sum(p.numel() for p in variant.params)


def peak_memory(kind: str, steps: int = 2) -> float:
    """MiB of memory the steps add on top of the loaded model (run in a fresh process)."""
    cfg = load_config()
    variant = build(kind, cfg)
    if torch.cuda.is_available():
        raise SystemExit("peak memory on CUDA is measured by gpu_check.sh")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        variant.step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one subprocess
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"mib": peak_memory(args.memory_of)}))
        return 0
    cfg = load_config()
    variants = {kind: build(kind, cfg) for kind in VARIANTS}
    for variant in variants.values():
        variant.step()  # warm-up
    times = {kind: [] for kind in VARIANTS}
    for round_ in range(args.rounds):
        order = VARIANTS[round_ % 3:] + VARIANTS[:round_ % 3]
        for kind in order:
            times[kind].append(_timed(variants[kind].step)[0])
    memory = {}
    if not args.no_memory:
        for kind in VARIANTS:
            cmd = [sys.executable, "-m", "bench.bench_training_peers", "--memory-of", kind, "--threads", str(args.threads)]
            memory[kind] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)["mib"]
    grun_median = quantiles(times["grun"])[0]
    rows = []
    print(f"training step, Llama d={cfg['model']['hidden_size']} x {cfg['model']['num_hidden_layers']} layers, "
          f"batch {cfg['batch']}+{cfg['batch']} x {cfg['seq_len']}, {device_name()}")
    print(f"{'variant':<6} {'trainable':>12} {'median ms':>10} {'grun / it':>10} {'peak MiB':>9}")
    for kind in VARIANTS:
        median, p20, p80 = quantiles(times[kind])
        mib = memory.get(kind)
        print(f"{kind:<6} {trainable(variants[kind]):>12,} {median * 1e3:>10.0f} {grun_median / median:>10.2f} "
              f"{'-' if mib is None else f'{mib:.0f}':>9}")
        common = dict(op="train_step", provider=kind, mode="gd", x=f"trainable={trainable(variants[kind])}",
                      device=device_name(), date=today(), config="llama-d512 layers=[4, 6, 7] fp32",
                      batch=f"{cfg['batch']}+{cfg['batch']}x{cfg['seq_len']}")
        rows.append(dict(common, median=median, p20=p20, p80=p80, unit="s"))
        if mib is not None:
            rows.append(dict(common, op="train_step_peak_memory", median=mib, p20="", p80="", unit="MiB"))
    if not args.no_csv:
        print("appended to", append_rows("training_peers.csv", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
