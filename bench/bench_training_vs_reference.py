"""One GRUN GD training step: grun_fast vs the reference stack (pyreft/pyvene), side by side on CPU.

Both sides build a random-weight Llama from bench/reference_stack/config.json (d=512, 8 layers,
8 heads, vocab 32000, fp32), put rank-4 gated LoReFT at layers [4, 6, 7] on the last prompt token and
time one GD step on the same token rows (batch 8 forget + 8 retain of 96 tokens):
-NLL_f + 2 NLL_r + 10 BCE(gates), backward, grad clip 1.0, AdamW (lr 4e-3, weight decay 0).

- ours (this process, project venv): grun_fast's GRUNTrainer, timing its own step code
  (training_step -> compute_loss, backward; then clip and AdamW as its loop does) in the variants of
  MODES, each switching on one more of the trainer's shortcuts: `baseline` (caches and shortcuts off; one
  forward of 16 rows), `cached` (+ reuse of the frozen lower layers), `answer_head` (+ LM head only at
  answer tokens), `prefix_kv` (+ cached prompt-prefix keys/values: the trainer's default). All start
  from the same weights and rows; their first losses are checked equal.
- reference (a worker process in its own venv, .cache/ref_venv, made by
  bench/reference_stack/setup_venv.sh on first use: it downloads pyreft, pyvene and
  transformers 4.45.1 from PyPI): bench/reference_stack/ref_step.py.
The sides alternate call by call for several rounds in one run. Also timed on each side, for calibration: two
plain no-grad forwards of the bare base model (forget and retain batches).

Usage: python bench/bench_training_vs_reference.py [--rounds 5 --steps 3 --threads N]
Each call is timed on the wall clock and in process CPU seconds; on a machine shared with other
work, run with --threads 1 and read the CPU-time ratio (both are reported and written).
Prints the ratios and appends rows to bench/results/training.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REF_DIR = HERE / "reference_stack"
REF_VENV = REPO / ".cache" / "ref_venv"
RESULTS = HERE / "results" / "training.csv"
sys.path.insert(0, str(REF_DIR))
sys.path.insert(0, str(REPO))  # run as a file too: `bench` is the repository's folder, not installed
from bench.common import device_name, quantiles  # noqa: E402
from workload import load_config, make_batches  # noqa: E402

CSV_FIELDS = ["op", "provider", "mode", "x", "median", "p20", "p80", "unit", "n", "device", "date",
              "model", "batch", "layers", "rank", "versions"]


# ----------------------------------------------------------------------------- our side
def _llama(cfg: dict) -> torch.nn.Module:
    """The benchmark's random-weight Llama (seeded: every call gives the same weights)."""
    import transformers

    torch.manual_seed(cfg["seed"])
    mcfg = transformers.LlamaConfig(**cfg["model"])
    mcfg._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(mcfg, dtype=torch.float32)


MODES = {
    "baseline": "the trainer's step with its caches and shortcuts off: one forward of 16 rows, LM head at every token",
    "cached": "+ the frozen layers below the lowest edited one reused per example (LowerLayerCache; steady "
              "state, epoch >= 2)",
    "answer_head": "+ the LM head applied only where an answer token is predicted",
    "prefix_kv": "+ the prompt prefix's keys/values cached per example, each step runs only the answer "
                 "suffix (PrefixCache; the trainer's default)",
}


class Ours:
    """grun_fast's GRUNTrainer on the same model shape: each call is the trainer's own step code
    (GRUNTrainer.training_step: stack_pair, compute_loss, backward) then grad clip 1.0 and AdamW, as its
    training loop does (the learning rate held constant). `mode` switches the trainer's shortcuts."""

    def __init__(self, cfg: dict, mode: str):
        import tempfile

        from transformers import TrainingArguments

        import grun_fast
        from grun_fast.unlearn.config import UnlearnConfig
        from grun_fast.unlearn import GRUNTrainer

        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        self.grun_fast, self.mode, self.cfg, self.bare = grun_fast, mode, cfg, None
        self.model = _llama(cfg).eval().requires_grad_(False)
        ucfg = UnlearnConfig(method="gd", positions="last_prompt", layers=cfg["layers"], rank=cfg["rank"],
                             batch_size=cfg["batch"],
                             lr=cfg["lr"], weight_decay=0.0, lambda_r=2.0, lambda_g=10.0, progress=False)
        grun_fast.patch(self.model, ucfg.grun_config(cfg["model"]["num_hidden_layers"]))
        self.modules = list(grun_fast.adapter_modules(self.model).values())
        self.params = list(grun_fast.adapter_parameters(self.model))
        for p in self.params:
            p.requires_grad_(True)
        self._tmp = tempfile.TemporaryDirectory(prefix="grun-bench-")
        args = TrainingArguments(output_dir=self._tmp.name, per_device_train_batch_size=cfg["batch"],
                                 learning_rate=cfg["lr"], weight_decay=0.0, max_grad_norm=1.0, report_to="none",
                                 remove_unused_columns=False, disable_tqdm=True, use_cpu=True)
        # retain reference 0: the retain term is the plain NLL, as on the reference stack's side
        self.trainer = GRUNTrainer(model=self.model, args=args, grun_model=self.model, grun_config=ucfg,
                                   retain_reference=torch.zeros(cfg["batch"]), pad_token_id=0)
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1   # set by the training loop otherwise
        self.opt = self.trainer.optimizer
        if mode == "baseline":
            self.trainer.lower_cache = None
        if mode in ("baseline", "cached"):
            self.trainer.answer_head = False
        if mode != "prefix_kv":
            self.trainer.prefix_cache = None
        self.forget, self.retain = forget, retain = make_batches(cfg)
        self.inputs = {}
        for side, batch in (("forget", forget), ("retain", retain)):
            for key in ("input_ids", "attention_mask", "labels"):
                self.inputs[f"{side}_{key}"] = batch[key]
            self.inputs[f"{side}_edit_pos"] = batch["positions"]
            self.inputs[f"{side}_index"] = torch.arange(batch["input_ids"].shape[0])
        self.losses: list[float] = []

    def step(self) -> None:
        loss = self.trainer.training_step(self.model, self.inputs)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(float(loss))

    def check(self) -> str:
        """The trainer took the path this mode names (no silent fallback)."""
        t = self.trainer

        def used(cache) -> bool:   # still on, and asked for entries (the first step only fills it: misses)
            return cache.enabled and cache.hits + cache.misses > 0
        if self.mode == "prefix_kv" and not used(t.prefix_cache):
            raise RuntimeError("the prefix cache was not used")
        if self.mode in ("cached", "answer_head") and not used(t.lower_cache):
            raise RuntimeError("the lower-layer cache was not used")
        return self.mode

    def plain_two_forwards(self) -> None:
        """Calibration: two no-grad forwards of the bare base model (an unpatched twin, same weights)."""
        if self.bare is None:
            self.bare = _llama(self.cfg).eval()
        with torch.no_grad():
            for b in (self.forget, self.retain):
                self.bare(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def orthonormality_error(self) -> float:
        errs = []
        with torch.no_grad():
            for m in self.modules:
                rot = m.orthonormal_rotation().float()
                errs.append(float((rot @ rot.T - torch.eye(rot.shape[0])).abs().max()))
        return max(errs)


def _timed(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _ref_timed(ref: "RefWorker", what: str) -> tuple[float, float]:
    res = ref.measure(what, 1, 0)
    return res["times_s"][0], res["cpu_s"][0]


# ----------------------------------------------------------------------------- reference side
def ensure_ref_venv() -> Path:
    python = REF_VENV / "bin" / "python"
    if (REF_VENV / ".grun_ref_complete").exists() and python.exists():
        return python
    print(f"The reference stack's venv is missing: creating {REF_VENV} with pyreft, pyvene and "
          "transformers 4.45.1 from PyPI (first run only; a minute or two, about 1.5 GB).", flush=True)
    subprocess.run(["bash", str(REF_DIR / "setup_venv.sh"), str(REF_VENV)], check=True)
    return python


class RefWorker:
    """ref_step.py --serve in the reference venv: one JSON line per request."""

    def __init__(self, python: Path, cfg: dict, threads: int):
        self.proc = subprocess.Popen(
            [str(python), str(REF_DIR / "ref_step.py"), "--serve", "--config", json.dumps(cfg),
             "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(REF_DIR))
        hello = self._read()
        self.env = hello["env"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"reference worker exited (code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def measure(self, what: str, n: int, warmup: int) -> dict:
        self.proc.stdin.write(f"{what} {n} {warmup}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- report
def summary(xs: list[float]) -> dict:
    median, p20, p80 = quantiles(xs)
    return {"median": median, "p20": p20, "p80": p80, "n": len(xs)}


def append_rows(rows: list[dict]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternations ours/reference")
    ap.add_argument("--steps", type=int, default=3, help="timed calls per side per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per side before timing")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                    help="our variants to time (the first also times the plain forwards)")
    ap.add_argument("--no-csv", action="store_true", help="print only, do not append to the CSV")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cfg = load_config()

    import transformers

    import grun_fast

    python = ensure_ref_venv()
    print("starting the reference worker ...", flush=True)
    ref = RefWorker(python, cfg, threads)
    ours = {mode: Ours(cfg, mode) for mode in args.modes}
    plain_side = ours[args.modes[0]]
    # Timed one call at a time, the sides interleaved (order rotated each round), so the load of a
    # shared machine falls on both alike. Each call gives wall-clock and process CPU seconds; on a
    # loaded machine the CPU time (best with --threads 1) is the steadier of the two.
    timers = {f"ours/{mode}": side.step for mode, side in ours.items()}
    timers = {key: (lambda fn=fn: _timed(fn)) for key, fn in timers.items()}
    timers["ref/step"] = lambda: _ref_timed(ref, "step")
    timers["ours/plain"] = lambda: _timed(plain_side.plain_two_forwards)
    timers["ref/plain"] = lambda: _ref_timed(ref, "plain")
    clocks = ("wall", "cpu")
    times = {c: {key: [] for key in timers} for c in clocks}
    per_round = {c: {mode: [] for mode in ours} for c in clocks}   # ratios of the round medians
    try:
        print(f"warming up ({args.warmup} call(s) per side) ...", flush=True)
        for fn in timers.values():
            for _ in range(args.warmup):
                fn()
        keys = list(timers)
        for rnd in range(args.rounds):
            round_t = {c: {key: [] for key in timers} for c in clocks}
            order = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
            for _ in range(args.steps):
                for key in order:
                    for c, value in zip(clocks, timers[key]()):
                        round_t[c][key].append(value)
            for c in clocks:
                rmed = {key: statistics.median(v) for key, v in round_t[c].items()}
                for key in timers:
                    times[c][key] += round_t[c][key]
                for mode in ours:
                    per_round[c][mode].append(rmed[f"ours/{mode}"] / rmed["ref/step"])
            w = {key: statistics.median(v) for key, v in round_t["wall"].items()}
            print(f"round {rnd + 1}/{args.rounds} (wall ms): "
                  + ", ".join(f"{key} {w[key] * 1e3:.0f}" for key in timers), flush=True)
        ref_orth = ref.measure("plain", 1, 0)["R_orthonormality_error"]
    finally:
        ref.close()

    for side in ours.values():
        side.check()
    first = {mode: side.losses[0] for mode, side in ours.items()}   # same start, same rows
    for mode, side in ours.items():
        if not all(x == x for x in side.losses):
            raise RuntimeError(f"our side ({mode}) produced a NaN loss")
        if abs(first[mode] - first[args.modes[0]]) > 1e-4 * abs(first[args.modes[0]]):
            raise RuntimeError(f"our variants disagree on the first step's loss: {first}")
    orth = max(side.orthonormality_error() for side in ours.values())
    stats = {c: {k: summary(v) for k, v in times[c].items()} for c in clocks}
    med = {c: {k: v["median"] for k, v in stats[c].items()} for c in clocks}
    ratios = {c: {mode: med[c][f"ours/{mode}"] / med[c]["ref/step"] for mode in ours} for c in clocks}
    cal_ref = {c: med[c]["ref/step"] / med[c]["ref/plain"] for c in clocks}
    cal_ours = {c: {mode: med[c][f"ours/{mode}"] / med[c]["ours/plain"] for mode in ours} for c in clocks}

    print()
    print(f"model {cfg['model']}, layers {cfg['layers']}, rank {cfg['rank']}, "
          f"batch {cfg['batch']}+{cfg['batch']} x {cfg['seq_len']} tokens, fp32, {threads} thread(s)")
    print(f"ours:      torch {torch.__version__}, transformers {transformers.__version__}, "
          f"grun_fast {grun_fast.__version__}")
    print(f"reference: torch {ref.env['torch']}, transformers {ref.env['transformers']}, "
          f"pyvene {ref.env['pyvene']}, pyreft {ref.env['pyreft']}")
    for c in clocks:
        print(f"{c + ' clock':28s}{'median ms':>10s}{'p20':>9s}{'p80':>9s}{'n':>4s}")
        for key in timers:
            st = stats[c][key]
            print(f"  {key:26s}{st['median'] * 1e3:10.1f}{st['p20'] * 1e3:9.1f}{st['p80'] * 1e3:9.1f}{st['n']:4d}")
    for c in clocks:
        for mode in ours:
            print(f"[{c}] GD step ratio ours({mode}) / reference = {ratios[c][mode]:.3f} "
                  f"(median of per-round ratios {statistics.median(per_round[c][mode]):.3f}; target <= 0.5)")
    for c in clocks:
        print(f"[{c}] calibration: reference step / its two plain no-grad forwards = {cal_ref[c]:.2f}x "
              f"(quoted: ~1.6x); ours: "
              + ", ".join(f"{cal_ours[c][m]:.2f}x ({m})" for m in ours)
              + f"; plain forwards ours / reference venv = {med[c]['ours/plain'] / med[c]['ref/plain']:.2f}")
    print(f"R orthonormality error after training: ours {orth:.1e}, reference {ref_orth:.1e}; "
          f"first-step loss of our variants agree: {first[args.modes[0]]:.5f}")
    for mode in ours:
        print(f"  {mode}: {MODES[mode]}")

    if not args.no_csv:
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        m = cfg["model"]
        common = {"x": cfg["batch"] * 2 * cfg["seq_len"], "device": device_name("cpu"), "date": now,
                  "model": f"llama d={m['hidden_size']} L={m['num_hidden_layers']} "
                           f"heads={m['num_attention_heads']} ffn={m['intermediate_size']} "
                           f"vocab={m['vocab_size']} fp32",
                  "batch": f"{cfg['batch']}+{cfg['batch']}x{cfg['seq_len']}",
                  "layers": " ".join(map(str, cfg["layers"])), "rank": cfg["rank"]}
        ours_v = f"torch {torch.__version__}; transformers {transformers.__version__}; grun_fast {grun_fast.__version__}"
        ref_v = (f"torch {ref.env['torch']}; transformers {ref.env['transformers']}; "
                 f"pyvene {ref.env['pyvene']}; pyreft {ref.env['pyreft']}")
        labels = {f"ours/{mode}": ("gd_step", "grun_fast", mode, ours_v) for mode in ours}
        labels.update({
            "ref/step": ("gd_step", "pyreft", "reference", ref_v),
            "ours/plain": ("plain_2fwd_nograd", "transformers", "base", ours_v),
            "ref/plain": ("plain_2fwd_nograd", "transformers", "base_ref_venv", ref_v),
        })
        units = {"wall": ("s", "ratio"), "cpu": ("cpu_s", "ratio_cpu")}
        rows = []
        for c in clocks:
            unit, ratio_unit = units[c]
            for key, (op, provider, mode, ver) in labels.items():
                st = stats[c][key]
                rows.append({"op": op, "provider": provider, "mode": mode, "unit": unit, "versions": ver,
                             **{q: f"{st[q]:.6g}" for q in ("median", "p20", "p80")}, "n": st["n"], **common})
            for mode in ours:
                rr = per_round[c][mode]
                rows.append({"op": "gd_step_ratio", "provider": "grun_fast/pyreft", "mode": mode,
                             "median": f"{ratios[c][mode]:.4g}", "p20": f"{quantiles(rr)[1]:.4g}",
                             "p80": f"{quantiles(rr)[2]:.4g}", "unit": ratio_unit, "n": len(rr),
                             "versions": f"{ours_v} | {ref_v}", **common})
            rows.append({"op": "calibration", "provider": "pyreft", "mode": "step/plain_2fwd",
                         "median": f"{cal_ref[c]:.4g}", "p20": "", "p80": "", "unit": ratio_unit,
                         "n": stats[c]["ref/step"]["n"], "versions": ref_v, **common})
        append_rows(rows)
        print(f"appended {len(rows)} rows to {RESULTS.relative_to(REPO)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
