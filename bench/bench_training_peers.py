"""One GRUN training step against its peers: full fine-tuning and LoRA (peft), same model, same rows.

The workload is the training benchmark's (bench/reference_stack/config.json: Llama d=512, 8 layers,
batch 8 forget + 8 retain of 96 tokens). Each variant does one optimiser step on the joint 16 rows:
- grun: the adapter at layers [4, 6, 7], gated GD (-NLL_f + 2 NLL_r + 10 BCE), base frozen, through
  bench_training_vs_reference.Ours (GRUNTrainer's step) with its shortcuts off (the same work as the peers);
- grun_fast: the same with the trainer's shortcuts on (cached prefix / lower layers, LM head at answers);
- lora: peft LoRA r=8 on q/k/v/o of every layer, GD loss (-NLL_f + 2 NLL_r), base frozen;
- full: every weight trainable, the same GD loss.
Times alternate call by call in one process (median of rounds); peak memory is measured per variant in a
fresh subprocess (CPU, Linux: the peak resident set during two steps above the loaded model).

    python -m bench.bench_training_peers [--rounds 5] [--threads 1] [--batch 2 --seq-len 48]
Rows go to bench/results/results.csv.
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_REPO = str(_Path(__file__).resolve().parents[1])
if _REPO not in _sys.path:  # `python bench/<script>.py` works too, not only `python -m bench.<script>`
    _sys.path.insert(0, _REPO)

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench import bench_training_vs_reference as ref_bench
from bench.bench_training_vs_reference import Ours, _llama, _timed, load_config, make_batches
from bench.common import append_rows, device_name, now, quantiles

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("grun", "grun_fast", "lora", "full")


def grun_mode(kind: str) -> str:
    """The mode of the training benchmark's `Ours` for a GRUN variant: `grun` does the same work as the peers
    (one forward of the 16 rows, LM head at every token); `grun_fast` is the trainer with its shortcuts on."""
    modes = list(ref_bench.MODES)
    prefer = ("baseline", "plain", "joint") if kind == "grun" else ("prefix_kv", "answer_head", "cached")
    return next((m for m in prefer if m in modes), modes[0] if kind == "grun" else modes[-1])


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
    return Ours(cfg, grun_mode(kind)) if kind.startswith("grun") else Peer(cfg, kind)


def trainable(variant) -> int:
    return sum(p.numel() for p in variant.params)


def workload(batch: int | None = None, seq_len: int | None = None) -> dict:
    """The training benchmark's config, optionally with fewer/shorter rows (the suite's --quick)."""
    cfg = load_config()
    if batch:
        cfg["batch"] = batch
    if seq_len:
        cfg["seq_len"] = seq_len
        lo, hi = cfg["prompt_len_range"]
        cfg["prompt_len_range"] = [min(lo, seq_len // 2), min(hi, seq_len - 8)]
    return cfg


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(kind: str, cfg: dict, steps: int = 2) -> float:
    """MiB of memory the steps add on top of the loaded model (run in a fresh process): the peak resident
    set during the steps (VmHWM, reset through /proc/self/clear_refs after loading) minus the resident set
    before them; gradients and optimiser state count, as they do in training."""
    variant = build(kind, cfg)
    if torch.cuda.is_available():
        raise SystemExit("peak memory on CUDA is measured by gpu_check.sh")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (Linux >= 4.0)
    before = _status_kib("VmRSS")
    for _ in range(steps):
        variant.step()
    return (_status_kib("VmHWM") - before) / 1024


def measure(rounds: int = 5, memory: bool = True, threads: int = 0, batch: int | None = None,
            seq_len: int | None = None) -> list[dict]:
    """Rows (results CSV): step time per variant, interleaved; peak memory per variant in a subprocess."""
    cfg = workload(batch, seq_len)
    variants = {kind: build(kind, cfg) for kind in VARIANTS}
    for variant in variants.values():
        variant.step()  # warm-up
    times = {kind: [] for kind in VARIANTS}
    for round_ in range(rounds):
        shift = round_ % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]
        for kind in order:
            times[kind].append(_timed(variants[kind].step)[0])
    mem = {}
    if memory:
        for kind in VARIANTS:
            cmd = [sys.executable, "-m", "bench.bench_training_peers", "--memory-of", kind, "--threads", str(threads)]
            cmd += ["--batch", str(cfg["batch"]), "--seq-len", str(cfg["seq_len"])]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            mem[kind] = json.loads(out.stdout.strip().splitlines()[-1])["mib"]
    grun_median = quantiles(times["grun"])[0]
    rows = []
    print(f"training step, Llama d={cfg['model']['hidden_size']} x {cfg['model']['num_hidden_layers']} layers, "
          f"batch {cfg['batch']}+{cfg['batch']} x {cfg['seq_len']}, {rounds} rounds, {device_name()}")
    print(f"{'variant':<9} {'trainable':>12} {'median ms':>10} {'grun / it':>10} {'peak MiB':>9}")
    for kind in VARIANTS:
        median, p20, p80 = quantiles(times[kind])
        mib = mem.get(kind)
        print(f"{kind:<9} {trainable(variants[kind]):>12,} {median * 1e3:>10.0f} {grun_median / median:>10.2f} "
              f"{'-' if mib is None else f'{mib:.0f}':>9}")
        common = dict(op="train_step", provider=kind, mode=f"gd {grun_mode(kind)}" if kind.startswith("grun") else "gd", d=cfg["model"]["hidden_size"], r=cfg["rank"],
                      dtype="fp32", device=device_name(), date=now(),
                      config=f"llama-d{cfg['model']['hidden_size']} L{cfg['model']['num_hidden_layers']} "
                             f"layers={cfg['layers']}",
                      batch=f"{cfg['batch']}+{cfg['batch']}x{cfg['seq_len']}", trainable=trainable(variants[kind]),
                      rounds=rounds)
        rows.append(dict(common, median=median, p20=p20, p80=p80, unit="s"))
        if mib is not None:
            rows.append(dict(common, op="train_step_peak_memory", median=mib, unit="MiB"))
        if kind in ("lora", "full"):  # per-round ratios: each round times all three back to back
            for ours in ("grun", "grun_fast"):
                ratios = [g / o for g, o in zip(times[ours], times[kind])]
                _, r20, r80 = quantiles(ratios)
                rows.append(dict(common, op="train_step_ratio", provider=f"{ours}/{kind}", mode="gd",
                                 median=quantiles(times[ours])[0] / median, p20=r20, p80=r80, unit="ratio"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--batch", type=int, help="rows per side (default: the config's 8)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default: the config's 96)")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one subprocess
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"mib": peak_memory(args.memory_of, workload(args.batch, args.seq_len))}))
        return 0
    rows = measure(args.rounds, not args.no_memory, args.threads, args.batch, args.seq_len)
    if not args.no_csv:
        print("appended to", append_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
