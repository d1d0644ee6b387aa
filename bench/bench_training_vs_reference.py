"""One GRUN GD training step: grun_fast vs the reference stack (pyreft/pyvene), side by side on CPU.

Both sides build a random-weight Llama from bench/reference_stack/config.json (d=512, 8 layers,
8 heads, vocab 32000, fp32), put rank-4 gated LoReFT at layers [4, 6, 7] on the last prompt token and
time one GD step on the same token rows (batch 8 forget + 8 retain of 96 tokens):
-NLL_f + 2 NLL_r + 10 BCE(gates), backward, grad clip 1.0, AdamW (lr 4e-3, weight decay 0).

- ours (this process, project venv): grun_fast.patch + grun_fast.edit_at, the step in plain torch.
  Two variants: `two_forwards` (forget, then retain, as the reference does) and `joint` (forget and
  retain rows in one forward of 16 rows).
- reference (a worker process in its own venv, .cache/ref_venv, made by
  bench/reference_stack/setup_venv.sh on first use: it downloads pyreft, pyvene and
  transformers 4.45.1 from PyPI): bench/reference_stack/ref_step.py.
The sides alternate call by call for several rounds in one run. Also timed on each side, for calibration: two
plain no-grad forwards of the bare base model (forget and retain batches).

Usage: python bench/bench_training_vs_reference.py [--rounds 5 --steps 3]
Prints the ratios and appends rows to bench/results/training.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
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
from common import gd_loss, load_config, make_batches  # noqa: E402

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


class Ours:
    """grun_fast on the same model shape, stepping with plain torch."""

    def __init__(self, cfg: dict, mode: str):
        import grun_fast

        self.grun_fast, self.mode, self.cfg, self.bare = grun_fast, mode, cfg, None
        self.model = _llama(cfg).eval().requires_grad_(False)
        grun_fast.patch(self.model, grun_fast.GRUNConfig(layers=cfg["layers"], rank=cfg["rank"]))
        self.modules = list(grun_fast.adapter_modules(self.model).values())
        self.params = list(grun_fast.adapter_parameters(self.model))
        self.opt = torch.optim.AdamW(self.params, lr=cfg["lr"], weight_decay=0.0)
        self.forget, self.retain = make_batches(cfg)
        self.joint = {k: torch.cat([self.forget[k], self.retain[k]]) for k in self.forget}
        self.losses: list[float] = []

    def _forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-mean answer NLL of the patched model and the gates of every layer (layer-major)."""
        with self.grun_fast.edit_at(self.model, positions=batch["positions"]):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"], use_cache=False)
        return out.loss, torch.stack([m.last_gate for m in self.modules])   # [layers, B]

    def _joint_losses(self):
        """Forget and retain rows in one forward; NLL per side, token mean as in a separate forward."""
        batch, n_f = self.joint, self.forget["input_ids"].shape[0]
        with self.grun_fast.edit_at(self.model, positions=batch["positions"]):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).logits
        gates = torch.stack([m.last_gate for m in self.modules])
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                labels.flatten(), reduction="none").view_as(labels)
        valid = (labels != -100).float()
        nll_f = (nll[:n_f] * valid[:n_f]).sum() / valid[:n_f].sum()
        nll_r = (nll[n_f:] * valid[n_f:]).sum() / valid[n_f:].sum()
        return nll_f, nll_r, gates[:, :n_f].reshape(-1), gates[:, n_f:].reshape(-1)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.mode == "joint":
            nll_f, nll_r, gate_f, gate_r = self._joint_losses()
        else:
            nll_f, gate_f = self._forward(self.forget)
            nll_r, gate_r = self._forward(self.retain)
            gate_f, gate_r = gate_f.reshape(-1), gate_r.reshape(-1)
        loss = gd_loss(nll_f, nll_r, gate_f, gate_r)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.losses.append(float(loss.detach()))

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


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "p20": quantile(xs, 0.2), "p80": quantile(xs, 0.8), "n": len(xs)}


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


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
    ours = {mode: Ours(cfg, mode) for mode in ("two_forwards", "joint")}
    # Timed one call at a time, the sides interleaved (order rotated each round), so the load of a
    # shared machine falls on both alike. Each "round ratio" compares the medians within one round.
    timers = {
        "ours/two_forwards": lambda: _timed(ours["two_forwards"].step),
        "ours/joint": lambda: _timed(ours["joint"].step),
        "ref/step": lambda: ref.measure("step", 1, 0)["times_s"][0],
        "ours/plain": lambda: _timed(ours["two_forwards"].plain_two_forwards),
        "ref/plain": lambda: ref.measure("plain", 1, 0)["times_s"][0],
    }
    times: dict[str, list[float]] = {key: [] for key in timers}
    per_round_ratio: dict[str, list[float]] = {"two_forwards": [], "joint": []}
    try:
        print(f"warming up ({args.warmup} call(s) per side) ...", flush=True)
        for fn in timers.values():
            for _ in range(args.warmup):
                fn()
        keys = list(timers)
        for rnd in range(args.rounds):
            round_t: dict[str, list[float]] = {key: [] for key in timers}
            order = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
            for _ in range(args.steps):
                for key in order:
                    round_t[key].append(timers[key]())
            for key in timers:
                times[key] += round_t[key]
            ref_med = statistics.median(round_t["ref/step"])
            for mode in ours:
                per_round_ratio[mode].append(statistics.median(round_t[f"ours/{mode}"]) / ref_med)
            print(f"round {rnd + 1}/{args.rounds}: ours two_forwards "
                  f"{statistics.median(round_t['ours/two_forwards']) * 1e3:.0f} ms, joint "
                  f"{statistics.median(round_t['ours/joint']) * 1e3:.0f} ms, reference {ref_med * 1e3:.0f} ms",
                  flush=True)
        ref_orth = ref.measure("plain", 1, 0)["R_orthonormality_error"]
    finally:
        ref.close()

    s = {k: summary(v) for k, v in times.items()}
    med = {k: v["median"] for k, v in s.items()}
    ratios = {mode: med[f"ours/{mode}"] / med["ref/step"] for mode in ours}
    cal_ref = med["ref/step"] / med["ref/plain"]
    cal_ours = {mode: med[f"ours/{mode}"] / med["ours/plain"] for mode in ours}
    orth = max(side.orthonormality_error() for side in ours.values())
    for side in ours.values():
        if not all(map(lambda x: x == x, side.losses)):
            raise RuntimeError("our side produced a NaN loss")

    print()
    print(f"model {cfg['model']}, layers {cfg['layers']}, rank {cfg['rank']}, "
          f"batch {cfg['batch']}+{cfg['batch']} x {cfg['seq_len']} tokens, fp32, {threads} threads")
    print(f"ours:      torch {torch.__version__}, transformers {transformers.__version__}, "
          f"grun_fast {grun_fast.__version__}")
    print(f"reference: torch {ref.env['torch']}, transformers {ref.env['transformers']}, "
          f"pyvene {ref.env['pyvene']}, pyreft {ref.env['pyreft']}")
    print(f"{'':28s}{'median ms':>10s}{'p20':>9s}{'p80':>9s}{'n':>4s}")
    for key in times:
        print(f"{key:28s}{s[key]['median'] * 1e3:10.1f}{s[key]['p20'] * 1e3:9.1f}"
              f"{s[key]['p80'] * 1e3:9.1f}{s[key]['n']:4d}")
    for mode in ours:
        print(f"GD step ratio ours({mode}) / reference = {ratios[mode]:.3f} "
              f"(median of per-round ratios {statistics.median(per_round_ratio[mode]):.3f}; target <= 0.5)")
    print(f"calibration: reference step / its two plain no-grad forwards = {cal_ref:.2f}x (quoted: ~1.6x)")
    print("calibration: our step / our two plain no-grad forwards = "
          + ", ".join(f"{cal_ours[m]:.2f}x ({m})" for m in ours))
    print(f"plain two forwards, ours / reference stack's transformers = {med['ours/plain'] / med['ref/plain']:.2f}")
    print(f"R orthonormality error after training: ours {orth:.1e}, reference {ref_orth:.1e}")

    if not args.no_csv:
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        m = cfg["model"]
        common = {"x": cfg["batch"] * 2 * cfg["seq_len"], "device": device_name(), "date": now,
                  "model": f"llama d={m['hidden_size']} L={m['num_hidden_layers']} "
                           f"heads={m['num_attention_heads']} ffn={m['intermediate_size']} "
                           f"vocab={m['vocab_size']} fp32",
                  "batch": f"{cfg['batch']}+{cfg['batch']}x{cfg['seq_len']}",
                  "layers": " ".join(map(str, cfg["layers"])), "rank": cfg["rank"]}
        ours_v = f"torch {torch.__version__}; transformers {transformers.__version__}; grun_fast {grun_fast.__version__}"
        ref_v = (f"torch {ref.env['torch']}; transformers {ref.env['transformers']}; "
                 f"pyvene {ref.env['pyvene']}; pyreft {ref.env['pyreft']}")
        rows = []
        for key, (op, provider, mode, ver) in {
            "ours/two_forwards": ("gd_step", "grun_fast", "two_forwards", ours_v),
            "ours/joint": ("gd_step", "grun_fast", "joint", ours_v),
            "ref/step": ("gd_step", "pyreft", "reference", ref_v),
            "ours/plain": ("plain_2fwd_nograd", "transformers", "base", ours_v),
            "ref/plain": ("plain_2fwd_nograd", "transformers", "base_ref_venv", ref_v),
        }.items():
            rows.append({"op": op, "provider": provider, "mode": mode, "unit": "s", "versions": ver,
                         **{q: f"{s[key][q]:.6g}" for q in ("median", "p20", "p80")}, "n": s[key]["n"],
                         **common})
        for mode in ours:
            rr = per_round_ratio[mode]
            rows.append({"op": "gd_step_ratio", "provider": "grun_fast/pyreft", "mode": mode,
                         "median": f"{ratios[mode]:.4g}", "p20": f"{quantile(rr, 0.2):.4g}",
                         "p80": f"{quantile(rr, 0.8):.4g}", "unit": "ratio", "n": len(rr),
                         "versions": f"{ours_v} | {ref_v}", **common})
        rows.append({"op": "calibration", "provider": "pyreft", "mode": "step/plain_2fwd",
                     "median": f"{cal_ref:.4g}", "p20": "", "p80": "", "unit": "ratio", "n": s["ref/step"]["n"],
                     "versions": ref_v, **common})
        append_rows(rows)
        print(f"appended {len(rows)} rows to {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
