"""Compile the gated LoReFT kernels for an NVIDIA architecture on a machine without a GPU.

Triton lowers to PTX and runs the bundled ptxas on the CPU, so compile errors of the CUDA path and the
register / spill budget of each configuration can be checked where only the interpreter can run:

    python -m grun_fast.kernels.aot                 # sm_90, the default configurations, d = 4096, r = 4
    python -m grun_fast.kernels.aot --arch 80 --rows 16 16384 --rank 4 64

Rows <= gated_loreft.SPLIT_D_MAX_ROWS also compile the two split-d forward kernels that `forward_2d` runs
there (`compile_split_forward`); `compile_forward` always builds the row-block kernel.

The launch arguments come from the same builders the launchers use, with meta tensors, and are
specialised the way Triton's JIT would specialise them at run time (integers equal to 1 become constants,
multiples of 16 and 16-byte-aligned pointers get the divisibility hint).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from grun_fast.kernels import gated_loreft as K

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8",
                 torch.float64: "fp64"}


@dataclass
class Compiled:
    name: str
    config: dict
    kernel: object

    def resources(self) -> dict[str, int]:
        """Registers, spill stack and static shared memory per thread block (from cuobjdump)."""
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(self.kernel.asm["cubin"])
            f.flush()
            text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        found = {}
        for part in text.replace(",", " ").split():
            if ":" in part:
                key, _, value = part.partition(":")
                if key in ("REG", "STACK", "LOCAL") and value.isdigit():
                    found[key.lower()] = int(value)
        found["shared_dynamic"] = self.kernel.metadata.shared
        return found


def _compile(fn, args: tuple, consts: dict, warps: int, arch: int, prec: str) -> object:
    jit = JITFunction(fn)
    names = jit.arg_names
    signature, constexprs, attrs = {}, {}, {}
    values = list(args) + [None] * len(consts)
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i,)] = prec if name == "PREC" else consts[name]
            continue
        value = values[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[(i,)] = 1
            else:
                signature[name] = "i32" if abs(value) < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name}: cannot specialise {type(value)}")
    source = ASTSource(jit, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def _meta_inputs(rows: int, d: int, r: int, dtype: torch.dtype, gate_logit: bool, masked: bool):
    """Shape-only stand-ins (meta tensors) for h, [A; w_g], R, [b; c], the gate logit and the row mask."""
    meta = dict(device="meta")
    h = torch.empty(rows, d, dtype=dtype, **meta)
    n_ag = r + (0 if gate_logit else 1)
    ag, rot, bias = (torch.empty(n_ag, d, **meta), torch.empty(r, d, **meta), torch.empty(n_ag, **meta))
    logit = torch.empty(rows, device="meta") if gate_logit else None
    mask = torch.empty(rows, dtype=torch.int8, **meta) if masked else None
    return h, ag, rot, bias, logit, mask


def _compiled(name: str, kernel, args, consts, warps: int, arch: int, dtype: torch.dtype) -> Compiled:
    prec = "tf32x3" if dtype == torch.float32 else "tf32"
    config = {k: consts[k] for k in ("BLOCK_M", "BLOCK_D", "RP")} | {"warps": warps, "prec": prec}
    return Compiled(name, config, _compile(kernel, args, consts, warps, arch, prec))


def compile_forward(rows: int, d: int, r: int, dtype: torch.dtype = torch.bfloat16, arch: int = 90,
                    gate_logit: bool = False, masked: bool = False, threshold: bool = False,
                    inplace: bool = False) -> Compiled:
    h, ag, rot, bias, logit, mask = _meta_inputs(rows, d, r, dtype, gate_logit, masked)
    out, gate = torch.empty_like(h), torch.empty(rows, device="meta")
    _, args, consts, warps = K._fwd_launch(h, ag, rot, bias, logit, mask, 0.5 if threshold else None, out, gate,
                                          inplace)
    return _compiled("fwd", K._fwd_kernel, args, consts, warps, arch, dtype)


def compile_split_forward(rows: int, d: int, r: int, dtype: torch.dtype = torch.bfloat16, arch: int = 90,
                          gate_logit: bool = False, masked: bool = False, threshold: bool = False,
                          inplace: bool = False) -> list[Compiled]:
    """Both launches of the few-row split-d forward (kernels/split_d.py) as `forward_2d` would run them;
    [] when the dispatch rule picks the row-block kernel for this shape."""
    h, ag, rot, bias, logit, mask = _meta_inputs(rows, d, r, dtype, gate_logit, masked)
    out, gate = torch.empty_like(h), torch.empty(rows, device="meta")
    split = K._split_launches(h, ag, rot, bias, logit, mask, 0.5 if threshold else None, out, gate, inplace)
    if split is None:
        return []
    return [_compiled(name, K._KERNEL_FNS[name], args, consts, warps, arch, dtype)
            for name, _grid, args, consts, warps in split[1]]


def compile_backward(rows: int, d: int, r: int, dtype: torch.dtype = torch.bfloat16, arch: int = 90,
                     gate_logit: bool = False, masked: bool = False, threshold: bool = False,
                     deterministic: bool = False) -> Compiled:
    h, ag, rot, bias, logit, mask = _meta_inputs(rows, d, r, dtype, gate_logit, masked)
    dgate = torch.empty(rows, device="meta")
    dh = torch.empty_like(h)
    dlogit = torch.empty(rows, device="meta") if gate_logit else None
    _, args, consts, warps, _ = K._bwd_launch(h, torch.empty_like(h), dgate, ag, rot, bias, logit, mask,
                                           0.5 if threshold else None, deterministic, dh, dlogit)
    return _compiled("bwd", K._bwd_kernel, args, consts, warps, arch, dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80, 90, ...)")
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 16384])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--rank", type=int, nargs="+", default=[4])
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dtype in args.dtype:
        for r in args.rank:
            for rows in args.rows:
                built = [compile_forward(rows, args.d, r, dtypes[dtype], args.arch),
                         compile_backward(rows, args.d, r, dtypes[dtype], args.arch),
                         *compile_split_forward(rows, args.d, r, dtypes[dtype], args.arch)]
                for c in built:
                    print(f"sm_{args.arch} {c.name} {dtype} rows={rows} d={args.d} r={r} {c.config}: "
                          f"{c.resources()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
