"""Time one GRUN GD training step the way the reference stack does it (pyreft on pyvene).

Runs INSIDE the reference venv (.cache/ref_venv, made by setup_venv.sh), never in the project's venv:
it needs transformers 4.45.1 as pyreft pins it. The gated LoReFT intervention is written here from
GRUN's math (out = h + sigmoid(w_g.h + c) * R^T (W h + b - R h)); like pyreft's LoreftIntervention it
keeps R orthonormal with torch.nn.utils.parametrizations.orthogonal on a [d, r] weight, so R is
re-orthogonalised at each access (twice per call, as pyreft's LoReFT does).

The step: intervened forward of the forget batch, intervened forward of the retain batch (pyvene
edits block_output of each chosen layer at the last prompt token of each row), loss
-NLL_f + 2 NLL_r + 10 BCE(gates; forget -> 1, retain -> 0), backward, grad clip 1.0, AdamW step.

Modes:
  ref_step.py [--config JSON] [--steps N --warmup W]   one measurement, JSON on stdout
  ref_step.py [--config JSON] --serve                  read "step N [W]" / "plain N [W]" / "quit"
                                                       lines on stdin, answer each with one JSON line
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch
from torch import nn

from workload import gd_loss, load_config, make_batches


def _quiet_imports():
    """pyvene prints an nnsight notice on import; keep stdout for JSON only."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pyreft
        import pyvene
        import transformers
    return pyreft, pyvene, transformers


pyreft, pyvene, transformers = _quiet_imports()
transformers.logging.set_verbosity_error()   # its notice about v4.46 logits dtypes is noise here


class GatedLoreftIntervention(pyvene.SourcelessIntervention, pyvene.TrainableIntervention,
                              pyvene.DistributedRepresentationIntervention):
    """GRUN's gated LoReFT, built on pyreft's pieces the way the reference code is.

    Parameter names follow the reference checkpoints: rotate_layer [d, r] (R^T),
    learned_source.{weight [r, d], bias [r]}, gate_func.{weight [1, d], bias [1]}.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs, keep_last_dim=True)
        rank = kwargs["low_rank_dimension"]
        dtype = kwargs.get("dtype", torch.float32)
        rotate = pyreft.interventions.LowRankRotateLayer(self.embed_dim, rank, init_orth=True)
        self.rotate_layer = torch.nn.utils.parametrizations.orthogonal(rotate)
        self.learned_source = nn.Linear(self.embed_dim, rank).to(dtype)
        self.gate_func = nn.Linear(self.embed_dim, 1).to(dtype)
        self.last_gate: torch.Tensor | None = None

    def forward(self, base, source=None, subspaces=None):
        gate = torch.sigmoid(self.gate_func(base))            # [B, units, 1]
        self.last_gate = gate.reshape(-1)
        rotated = self.rotate_layer(base)                     # R h (orthogonalises R)
        edit = torch.matmul(self.learned_source(base) - rotated,
                            self.rotate_layer.weight.T)       # R^T(...) (orthogonalises R again)
        return (base + gate * edit).to(base.dtype)


def build(cfg: dict):
    torch.manual_seed(cfg["seed"])
    mcfg = transformers.LlamaConfig(**cfg["model"])
    mcfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(mcfg, torch_dtype=torch.float32)
    model.eval()
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": cfg["rank"],
             "intervention": GatedLoreftIntervention(embed_dim=mcfg.hidden_size,
                                                     low_rank_dimension=cfg["rank"],
                                                     dtype=torch.float32)}
            for layer in cfg["layers"]]
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps),
                                       set_device=False)
    params = [p for p in reft_model.parameters() if p.requires_grad]
    n_base_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_base_trainable:
        raise RuntimeError(f"base model has {n_base_trainable} trainable parameters; expected frozen")
    # weight_decay=0: with Householder-parametrised R, AdamW's default decay zeroes R (GRUN.md s8).
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    return model, reft_model, params, opt


def intervened_forward(reft_model, batch, n_layers: int):
    locs = [[[int(p)] for p in batch["positions"]]] * n_layers
    _, cf = reft_model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                       unit_locations={"sources->base": (None, locs)},
                       labels=batch["labels"], use_cache=False)
    gates = [iv.last_gate for iv in _interventions(reft_model)]
    return cf.loss, torch.cat(gates)


def _interventions(reft_model):
    return [v for v in reft_model.interventions.values() if isinstance(v, GatedLoreftIntervention)]


def train_step(reft_model, params, opt, forget, retain, n_layers: int) -> float:
    opt.zero_grad(set_to_none=True)
    nll_f, gate_f = intervened_forward(reft_model, forget, n_layers)
    nll_r, gate_r = intervened_forward(reft_model, retain, n_layers)
    loss = gd_loss(nll_f, nll_r, gate_f, gate_r)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


def time_calls(fn, n: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each of n calls after warmup calls."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


class Bench:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.model, self.reft_model, self.params, self.opt = build(cfg)
        self.forget, self.retain = make_batches(cfg)
        self.n_layers = len(cfg["layers"])
        self.losses: list[float] = []

    def step(self):
        self.losses.append(train_step(self.reft_model, self.params, self.opt, self.forget,
                                      self.retain, self.n_layers))

    def plain_two_forwards(self):
        """Calibration: two no-grad forwards of the bare base model (forget and retain batches)."""
        with torch.no_grad():
            for b in (self.forget, self.retain):
                self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           use_cache=False)

    def measure(self, what: str, n: int, warmup: int) -> dict:
        fn = {"step": self.step, "plain": self.plain_two_forwards}[what]
        wall, cpu = time_calls(fn, n, warmup)
        return {"what": what, "n": n, "median_s": statistics.median(wall), "times_s": wall,
                "cpu_s": cpu}

    def orthonormality_error(self) -> float:
        errs = []
        for iv in _interventions(self.reft_model):
            rt = iv.rotate_layer.weight.detach()               # [d, r] = R^T
            errs.append(float((rt.T @ rt - torch.eye(rt.shape[1])).abs().max()))
        return max(errs)


def environment() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "pyvene": getattr(pyvene, "__version__", _dist_version("pyvene")),
            "pyreft": _dist_version("pyreft"), "threads": torch.get_num_threads(),
            "python": sys.version.split()[0]}


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=json.loads, default=None,
                    help="JSON of the benchmark config (default: config.json beside this file)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--serve", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.config is None:
        args.config = load_config()
    bench = Bench(args.config)
    if not args.serve:
        out = {"env": environment(), "config": args.config,
               "step": bench.measure("step", args.steps, args.warmup),
               "plain": bench.measure("plain", args.steps, args.warmup)}
        out["calibration"] = out["step"]["median_s"] / out["plain"]["median_s"]
        out["R_orthonormality_error"] = bench.orthonormality_error()
        out["losses"] = bench.losses
        print(json.dumps(out))
        return 0
    print(json.dumps({"ready": True, "env": environment()}), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            break
        what, n = parts[0], int(parts[1])
        warmup = int(parts[2]) if len(parts) > 2 else 1
        res = bench.measure(what, n, warmup)
        res["R_orthonormality_error"] = bench.orthonormality_error()
        res["last_loss"] = bench.losses[-1] if bench.losses else None
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
