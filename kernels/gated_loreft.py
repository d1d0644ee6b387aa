"""Fused Triton kernels for gated LoReFT (GRUN.md section 2), forward and backward, plus their custom ops.

Folded math per row h (row vectors), A = W - R:

    p = h A^T + b  [r],   a = h . w_g + c  (or a given logit),   s = sigmoid(a)
    out = h + s * (p @ R)                               (only on edited rows; others are copied bit-exact)

Backward with y = dL/dout and g = dL/ds (the gate output's own gradient):

    q = y R^T,  ds = q . p,  da = (ds + g) s (1 - s),  dp = s q
    dh = y + dp A + da w_g,   dW = dp^T h,   dR = (s p)^T y - dp^T h,   db = sum dp,
    dw_g = da^T h,   dc = sum da,   (MLP gate: d logit = da)

The linear gate is folded into the skinny product: with ag = [A; w_g] and [b; c], one product gives
[p | a] = h ag^T + [b | c] in the forward, and [dp | da] @ ag = dp A + da w_g, [dp | da]^T h = [dW; dw_g]
in the backward.

One forward launch: each program owns BLOCK_M rows; pass 1 walks d reading `h` once and accumulates
[p | a] in fp32; pass 2 walks d again, last tile first (re-reading the same rows, expected from L2), and
writes `out`. At most SPLIT_D_MAX_ROWS rows (decode) take the split-d forward of `split_d.py` instead: two
launches whose programs each own a range of d, so up to 32 SMs share a few-row call. One backward launch:
the same two passes over `h` and `dout` per row block, writing `dh` in pass 2 and accumulating the fp32
weight-gradient partials [dp | da]^T h and (s p)^T y - dp^T h (= dR): atomically into one buffer (default) or, with
deterministic=True, into one buffer per program (each program owns a fixed contiguous range of row
blocks), summed afterwards by torch in a fixed order.

Kernels are wrapped lazily and use only Triton builtins: CUDA tensors get them compiled, CPU tensors run
them in the Triton interpreter, whenever triton was first imported. `grun_fast.functional` validates the
inputs, folds the parameters and decides when the kernels run (fp32/bf16/fp16 up to rank 127, CUDA or
CPU under TRITON_INTERPRET=1); everything else takes its PyTorch path, the only other implementation.

This module holds the kernels and their raw launchers (`forward_2d`, `backward_2d`: 2-D inputs, folded
parameters, no autograd). The entry points (`forward_folded`, the differentiable `gated_loreft_triton` /
`gated_loreft_logit_triton`, the custom ops torch.compile sees) live in ops.py.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from grun_fast.errors import GRUNError
from grun_fast.kernels import split_d

# forward_2d splits d across programs (kernels/split_d.py: two launches) for at most this many rows: at
# decode batch sizes one row-block program walking all of d leaves most of the GPU idle.
SPLIT_D_MAX_ROWS = 16
# Deterministic backward keeps one fp32 partial per program; cap their total size.
DETERMINISTIC_WORKSPACE_BYTES = 256 * 2**20
# Block-size overrides for tuning on a GPU, e.g. {"fwd_block_m": 32, "bwd_block_d": 128, "split_block_d": 64,
# "split_warps": 8}.
CONFIG_OVERRIDES: dict[str, int] = {}


# ----------------------------------------------------------------------------------------------------------
# Kernels (plain functions; wrapped by `_kernel` for the interpreter or the compiler on first use).
# They call only Triton builtins (tl.full, not tl.zeros; exp, not tl.sigmoid; tl.reduce with the standard sum
# combiner, which the interpreter maps to numpy): the jit-decorated helpers of triton.language.standard are
# compiled-mode objects when triton was imported without TRITON_INTERPRET=1 and cannot be interpreted.
# ----------------------------------------------------------------------------------------------------------

_sum_combine = tl.standard._sum_combine


def _fwd_kernel(
    h_ptr, out_ptr, gate_ptr,
    ag_ptr, rot_ptr, bias_ptr, logit_ptr, rows_ptr,
    n, d, r,
    stride_hm, stride_hd, stride_om, stride_od,
    threshold,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr,
    GATE_LOGIT: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_THRESH: tl.constexpr, INPLACE: tl.constexpr,
    PREC: tl.constexpr,
):
    """ag = [A; w_g] (linear gate) or A (logit gate), fp32 [n_ag, d]; bias = [b; c] or b, fp32 [n_ag]."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    offs_k = tl.arange(0, RP)
    if GATE_LOGIT:
        n_ag = r
    else:
        n_ag = r + 1
    ag_mask = offs_k < n_ag
    rot_mask = offs_k < r
    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm
    o_rows = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om

    # pass 1: [p | a] = h @ [A; w_g]^T + [b | c], fp32 accumulation
    acc = tl.full([BLOCK_M, RP], 0.0, tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d
        h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        agt = tl.load(ag_ptr + offs_k[None, :] * d + offs_d[:, None], mask=ag_mask[None, :] & d_mask[:, None],
                      other=0.0)
        acc = tl.dot(h.to(tl.float32), agt, acc, input_precision=PREC)
    acc += tl.load(bias_ptr + offs_k, mask=ag_mask, other=0.0)[None, :]

    if GATE_LOGIT:
        logit = tl.load(logit_ptr + offs_m, mask=m_mask, other=0.0)
    else:
        logit = tl.reduce(tl.where(offs_k[None, :] == r, acc, 0.0), 1, _sum_combine)
    s = 1.0 / (1.0 + tl.exp(-logit))
    tl.store(gate_ptr + offs_m, s, mask=m_mask)

    edit = m_mask
    if HAS_ROWS:
        edit = edit & (tl.load(rows_ptr + offs_m, mask=m_mask, other=0) != 0)
    if HAS_THRESH:
        edit = edit & (s >= threshold)
    sp = tl.where(edit[:, None] & rot_mask[None, :], acc * s[:, None], 0.0)

    # pass 2: out = h + (s p) @ R on edited rows, h bit-exact elsewhere (in place: blocks without an edit skip it)
    if INPLACE:
        todo = edit
    else:
        todo = m_mask
    n_todo = tl.reduce(todo.to(tl.int32), 0, _sum_combine)
    if n_todo > 0:
        # last tile first: the tiles pass 1 read most recently are the likeliest to be still in L2
        n_tiles = (d + BLOCK_D - 1) // BLOCK_D
        for t in range(0, n_tiles):
            offs_d = (n_tiles - 1 - t) * BLOCK_D + tl.arange(0, BLOCK_D)
            d_mask = offs_d < d
            ld_mask = m_mask[:, None] & d_mask[None, :]
            h_raw = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=ld_mask, other=0.0)
            rt = tl.load(rot_ptr + offs_k[:, None] * d + offs_d[None, :], mask=rot_mask[:, None] & d_mask[None, :],
                         other=0.0)
            upd = tl.dot(sp, rt, input_precision=PREC)
            new = (h_raw.to(tl.float32) + upd).to(h_raw.dtype)
            res = tl.where(edit[:, None], new, h_raw)
            if INPLACE:
                st_mask = edit[:, None] & d_mask[None, :]
            else:
                st_mask = ld_mask
            tl.store(o_rows + offs_d[None, :] * stride_od, res, mask=st_mask)


def _bwd_kernel(
    h_ptr, y_ptr, dgate_ptr, dh_ptr, dlogit_ptr,
    ag_ptr, rot_ptr, bias_ptr, logit_ptr, rows_ptr,
    ws_ptr, wsv_ptr,
    n, d, r, n_blocks, n_progs,
    stride_hm, stride_hd, stride_ym, stride_yd, stride_dm, stride_dd,
    threshold,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr,
    GATE_LOGIT: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_THRESH: tl.constexpr, HAS_DGATE: tl.constexpr,
    DETERMINISTIC: tl.constexpr, PREC: tl.constexpr,
):
    """Per row block: recompute [p | a] and q = y R^T (pass 1), then dh = y + [dp | da] @ [A; w_g] and the
    partials [dp | da]^T h = [dA; dw_g], (s p)^T y - dp^T h = dR, sum [dp | da] = [db; dc] (pass 2)."""
    pid = tl.program_id(0)
    # contiguous range of row blocks owned by this program (never empty: n_progs <= n_blocks)
    blk_start = (pid * n_blocks) // n_progs
    blk_end = ((pid + 1) * n_blocks) // n_progs
    offs_k = tl.arange(0, RP)
    if GATE_LOGIT:
        n_ag = r
    else:
        n_ag = r + 1
    ag_mask = offs_k < n_ag
    rot_mask = offs_k < r
    # workspace per program (one shared by all with atomics): [G1 = [dA; dw_g] : n_ag*d][G2 = dR : r*d], [db; dc : RP]
    g2_off = n_ag * d
    if DETERMINISTIC:
        ws = ws_ptr + pid.to(tl.int64) * ((n_ag + r) * d)
        wsv = wsv_ptr + pid * RP
    else:
        ws = ws_ptr
        wsv = wsv_ptr
    bias = tl.load(bias_ptr + offs_k, mask=ag_mask, other=0.0)
    dv_acc = tl.full([RP], 0.0, tl.float32)

    for blk in range(blk_start, blk_end):
        if DETERMINISTIC:
            # the partials stored for the previous block are re-read below, possibly by other threads
            tl.debug_barrier()
        offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < n
        offs_m64 = offs_m.to(tl.int64)
        h_rows = h_ptr + offs_m64[:, None] * stride_hm
        y_rows = y_ptr + offs_m64[:, None] * stride_ym
        dh_rows = dh_ptr + offs_m64[:, None] * stride_dm

        # pass 1: [p | a] = h [A; w_g]^T + [b | c],  q = y R^T
        acc_p = tl.full([BLOCK_M, RP], 0.0, tl.float32)
        acc_q = tl.full([BLOCK_M, RP], 0.0, tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < d
            ld_mask = m_mask[:, None] & d_mask[None, :]
            h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=ld_mask, other=0.0)
            y = tl.load(y_rows + offs_d[None, :] * stride_yd, mask=ld_mask, other=0.0)
            agt = tl.load(ag_ptr + offs_k[None, :] * d + offs_d[:, None], mask=ag_mask[None, :] & d_mask[:, None],
                          other=0.0)
            rt = tl.load(rot_ptr + offs_k[None, :] * d + offs_d[:, None], mask=rot_mask[None, :] & d_mask[:, None],
                         other=0.0)
            acc_p = tl.dot(h.to(tl.float32), agt, acc_p, input_precision=PREC)
            acc_q = tl.dot(y.to(tl.float32), rt, acc_q, input_precision=PREC)
        acc_p += bias[None, :]

        if GATE_LOGIT:
            logit = tl.load(logit_ptr + offs_m, mask=m_mask, other=0.0)
        else:
            logit = tl.reduce(tl.where(offs_k[None, :] == r, acc_p, 0.0), 1, _sum_combine)
        s = 1.0 / (1.0 + tl.exp(-logit))
        edit = m_mask
        if HAS_ROWS:
            edit = edit & (tl.load(rows_ptr + offs_m, mask=m_mask, other=0) != 0)
        if HAS_THRESH:
            edit = edit & (s >= threshold)
        edit_k = edit[:, None] & rot_mask[None, :]
        # q is zero beyond column r - 1 (masked R), so q . [p | a] = q . p
        ds = tl.where(edit, tl.reduce(acc_q * acc_p, 1, _sum_combine), 0.0)
        if HAS_DGATE:
            ds += tl.load(dgate_ptr + offs_m, mask=m_mask, other=0.0)
        # s (1 - s) with 1 - s = sigmoid(-a) computed directly: no cancellation when s is near 1
        da = tl.where(m_mask, ds * s * (1.0 / (1.0 + tl.exp(logit))), 0.0)
        sp = tl.where(edit_k, acc_p * s[:, None], 0.0)
        dpa = tl.where(edit_k, acc_q * s[:, None], 0.0)
        if GATE_LOGIT:
            tl.store(dlogit_ptr + offs_m, da, mask=m_mask)
        else:
            dpa += tl.where(offs_k[None, :] == r, da[:, None], 0.0)
        dv_acc += tl.reduce(dpa, 0, _sum_combine)
        # "not the first block of this program", as a tensor (a bare scalar mask trips the interpreter)
        not_first = (offs_k * 0 + blk) != blk_start
        dpa_t = tl.trans(dpa)
        sp_t = tl.trans(sp)

        # pass 2: dh = y + [dp | da] @ [A; w_g];  G1 += [dp | da]^T h,  G2 += (s p)^T y - dp^T h
        # (last tile first: the tiles pass 1 read most recently are the likeliest to be still in L2)
        n_tiles = (d + BLOCK_D - 1) // BLOCK_D
        for t in range(0, n_tiles):
            offs_d = (n_tiles - 1 - t) * BLOCK_D + tl.arange(0, BLOCK_D)
            d_mask = offs_d < d
            ld_mask = m_mask[:, None] & d_mask[None, :]
            h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=ld_mask, other=0.0).to(tl.float32)
            y = tl.load(y_rows + offs_d[None, :] * stride_yd, mask=ld_mask, other=0.0).to(tl.float32)
            w_offs = offs_k[:, None] * d + offs_d[None, :]
            g1_mask = ag_mask[:, None] & d_mask[None, :]
            g2_mask = rot_mask[:, None] & d_mask[None, :]
            ag = tl.load(ag_ptr + w_offs, mask=g1_mask, other=0.0)
            dh = y + tl.dot(dpa, ag, input_precision=PREC)
            tl.store(dh_rows + offs_d[None, :] * stride_dd, dh.to(dh_ptr.dtype.element_ty), mask=ld_mask)
            g1 = tl.dot(dpa_t, h, input_precision=PREC)
            g2 = tl.dot(sp_t, y, input_precision=PREC) - g1  # dR partial: (s p)^T y - dp^T h (rows < r stored)
            if DETERMINISTIC:
                g1 += tl.load(ws + w_offs, mask=g1_mask & not_first[:, None], other=0.0)
                g2 += tl.load(ws + g2_off + w_offs, mask=g2_mask & not_first[:, None], other=0.0)
                tl.store(ws + w_offs, g1, mask=g1_mask)
                tl.store(ws + g2_off + w_offs, g2, mask=g2_mask)
            else:
                tl.atomic_add(ws + w_offs, g1, mask=g1_mask, sem="relaxed")
                tl.atomic_add(ws + g2_off + w_offs, g2, mask=g2_mask, sem="relaxed")

    if DETERMINISTIC:
        tl.store(wsv + offs_k, dv_acc, mask=ag_mask)
    else:
        tl.atomic_add(wsv + offs_k, dv_acc, mask=ag_mask, sem="relaxed")


_KERNEL_FNS = {"fwd": _fwd_kernel, "bwd": _bwd_kernel, **split_d.KERNEL_FNS}
_KERNEL_CACHE: dict[tuple[str, bool], object] = {}


def _kernel(name: str, interpret: bool):
    """The kernel `name` compiled for CUDA or wrapped for the Triton interpreter (cached)."""
    key = (name, interpret)
    if key not in _KERNEL_CACHE:
        fn = _KERNEL_FNS[name]
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNEL_CACHE[key] = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            _KERNEL_CACHE[key] = JITFunction(fn)
    return _KERNEL_CACHE[key]


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------


def _interpreting(t: torch.Tensor) -> bool:
    """CPU tensors always run in the interpreter; CUDA tensors too when TRITON_INTERPRET=1 (then triton's own
    helpers were built for the interpreter and nothing can be compiled)."""
    return not t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, split_d.next_pow2(max(1, x)))


@functools.lru_cache(maxsize=None)
def _rank_pad(n_ag: int) -> int:
    """Columns of the [BLOCK_M, RP] accumulators: r (+1 for the gate), padded to a power of two >= 16
    (tl.dot needs every dimension >= 16)."""
    return _pow2_at_least(n_ag, 16)


def _precision(h: torch.Tensor) -> str:
    """fp32 inputs: 3xTF32 (about fp32 accuracy on tensor cores); 16-bit inputs: TF32 (h is exact in TF32,
    the weights round to 10 mantissa bits, far below the 16-bit output rounding); the interpreter computes
    in fp32 whatever is asked."""
    if not h.is_cuda:
        return "ieee"
    if _capability_major(h.device.index) < 8:
        return "ieee"
    return "tf32x3" if h.dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _capability_major(index: Optional[int]) -> int:
    """Compute capability of a CUDA device (looked up once: torch's query costs microseconds per call)."""
    return torch.cuda.get_device_capability(index)[0]


@functools.lru_cache(maxsize=1024)  # pure; memoised because it runs on every call (host time)
def _tile_d(d: int, rp: int, widest: int, warps: int, per_thread: int) -> int:
    """BLOCK_D: at most `widest`, and small enough that an [RP, BLOCK_D] fp32 weight tile stays within
    `per_thread` registers per thread (wide ranks get narrow d tiles instead of spilling)."""
    budget = max(16, per_thread * 32 * warps // rp)
    return max(16, min(widest, _pow2_at_least(d, 16), split_d.next_pow2(budget + 1) // 2))


def _fwd_config(n: int, d: int, rp: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps). Few rows: one program walks all of d, so take wide d tiles and
    more warps (fewer dependent iterations; <= 16 rows of 16-bit: 512-wide tiles, 16 warps). Many rows:
    16-row blocks keep the pass-2 re-read of each block small
    (16 x 4096 x 2 B = 128 KiB per program). fp32 inputs (3xTF32 splits every operand) get half the tile.
    Starting points, checked for spills with `python -m grun_fast.kernels.aot`, to be tuned on a GPU with
    `bench_kernels.py --sweep`."""
    return _launch_config("fwd", n, d, rp, dtype, shrink=1)


def _bwd_config(n: int, d: int, rp: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of the backward: two weight tiles per pass and two [RP, BLOCK_D] fp32
    gradient partials, so half the forward's d tile."""
    return _launch_config("bwd", n, d, rp, dtype, shrink=2)


def _launch_config(kind: str, n: int, d: int, rp: int, dtype: torch.dtype, shrink: int) -> tuple[int, int, int]:
    """The rule both passes share; `shrink` divides the d tile and the register budget (backward: 2)."""
    small = n <= 64
    tiny = n <= 16 and dtype != torch.float32  # 3xTF32 needs more than 128 registers a thread
    warps = CONFIG_OVERRIDES.get(f"{kind}_warps", 16 if tiny else 8 if small or rp >= 64 else 4)
    per_thread = (16 if dtype != torch.float32 else 8) // shrink
    block_m = CONFIG_OVERRIDES.get(f"{kind}_block_m", 16)
    widest = (512 if tiny else 256 if small else 128) // shrink
    block_d = CONFIG_OVERRIDES.get(f"{kind}_block_d", _tile_d(d, rp, widest, warps, per_thread))
    return block_m, block_d, warps


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: two programs at most, so the several-blocks-per-program path is exercised


def _flat_rows(h: torch.Tensor) -> torch.Tensor:
    """h as a 2-D [n, d] tensor: a view when the leading dims flatten to one stride, else a copy."""
    return h if h.dim() == 2 else h.reshape(-1, h.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# Raw launchers (no autograd): 2-D inputs, folded fp32 contiguous parameters
# ----------------------------------------------------------------------------------------------------------


def _fwd_launch(h, ag, rot, bias, logit, rows, threshold, out, gate, inplace):
    """(grid, positional args, constexpr kwargs, num_warps) of one forward launch."""
    n, d = h.shape
    r = rot.shape[0]
    gate_logit = logit is not None
    rp = _rank_pad(r + (0 if gate_logit else 1))
    block_m, block_d, warps = _fwd_config(n, d, rp, h.dtype)
    args = (
        h, out, gate, ag, rot, bias, logit if gate_logit else bias, rows if rows is not None else bias,
        n, d, r, h.stride(0), h.stride(1), out.stride(0), out.stride(1),
        float(threshold) if threshold is not None else 0.0,
    )
    consts = dict(
        BLOCK_M=block_m, BLOCK_D=block_d, RP=rp,
        GATE_LOGIT=gate_logit, HAS_ROWS=rows is not None, HAS_THRESH=threshold is not None, INPLACE=inplace,
        PREC=_precision(h),
    )
    return (split_d.cdiv(n, block_m),), args, consts, warps


def forward_2d(
    h: torch.Tensor,
    ag: torch.Tensor,
    rot: torch.Tensor,
    bias: torch.Tensor,
    logit: Optional[torch.Tensor],
    rows: Optional[torch.Tensor],
    threshold: Optional[float],
    out: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on h [n, d] with parameters from `grun_fast.functional.fold` (fp32).

    `logit` [n] fp32 is given for the logit (MLP) gate, None for the linear gate (then `ag` has r + 1 rows).
    `rows` is an int8 mask [n] or None. `out`/`gate` may be preallocated (every element is written);
    `inplace=True` writes only the edited rows of `out` (pass out=h to edit h in place).
    """
    n, d = h.shape
    if inplace and out is None:
        raise GRUNError("inplace=True needs `out` (usually h itself)")
    if out is None:
        out = torch.empty((n, d), dtype=h.dtype, device=h.device)
    if gate is None:
        gate = torch.empty((n,), dtype=torch.float32, device=h.device)
    if n == 0:
        return out, gate
    interpret = _interpreting(h)
    split = _split_launches(h, ag, rot, bias, logit, rows, threshold, out, gate, inplace)
    if split is not None:
        _ws, steps = split  # the workspace lives until both launches are queued
        for name, grid, args, consts, warps in steps:
            _kernel(name, interpret)[grid](*args, **consts, num_warps=warps)
        return out, gate
    grid, args, consts, warps = _fwd_launch(h, ag, rot, bias, logit, rows, threshold, out, gate, inplace)
    _kernel("fwd", interpret)[grid](*args, **consts, num_warps=warps)
    return out, gate


def _split_launches(h, ag, rot, bias, logit, rows, threshold, out, gate, inplace):
    """The split-d forward (workspace, launches) when the rule picks it: at most SPLIT_D_MAX_ROWS rows and d
    wide enough for two ranges; else None (the row-block kernel runs)."""
    n, d = h.shape
    if n > SPLIT_D_MAX_ROWS:
        return None
    rp = _rank_pad(rot.shape[0] + (0 if logit is not None else 1))
    warps = CONFIG_OVERRIDES.get("split_warps", split_d.WARPS)
    cap = _tile_d(d, rp, 256, warps, 16 if h.dtype != torch.float32 else 8)
    plan = split_d.plan(d, rp, cap, CONFIG_OVERRIDES.get("split_block_d"))
    if plan is None:
        return None
    return split_d.launches(h, ag, rot, bias, logit, rows, threshold, out, gate, inplace, plan, rp, _precision(h),
                            warps)


def _bwd_launch(h, dout, dgate, ag, rot, bias, logit, rows, threshold, deterministic, dh, dlogit):
    """(grid, positional args, constexpr kwargs, num_warps, workspace) of one backward. The workspace is one
    fp32 buffer (one allocation, one zero-fill): `programs` partials [G1; G2] of n_ws, then `programs`
    vectors [db; dc] of RP."""
    n, d = h.shape
    r = rot.shape[0]
    gate_logit = logit is not None
    rp = _rank_pad(r + (0 if gate_logit else 1))
    dev = h.device
    block_m, block_d, warps = _bwd_config(n, d, rp, h.dtype)
    n_blocks = split_d.cdiv(n, block_m)
    n_ws = (2 * r + (0 if gate_logit else 1)) * d  # [dA; dw_g] and dR rows, fp32
    if deterministic:
        per_prog = (n_ws + rp) * 4
        n_progs = max(1, min(n_blocks, 2 * _num_sms(dev), DETERMINISTIC_WORKSPACE_BYTES // per_prog))
        ws = torch.empty((n_progs * (n_ws + rp),), dtype=torch.float32, device=dev)
    else:
        n_progs = n_blocks
        ws = torch.zeros((n_ws + rp,), dtype=torch.float32, device=dev)
    args = (
        h, dout, dgate if dgate is not None else bias, dh, dlogit if gate_logit else bias,
        ag, rot, bias, logit if gate_logit else bias, rows if rows is not None else bias,
        ws, ws[(n_progs if deterministic else 1) * n_ws:],
        n, d, r, n_blocks, n_progs,
        h.stride(0), h.stride(1), dout.stride(0), dout.stride(1), dh.stride(0), dh.stride(1),
        float(threshold) if threshold is not None else 0.0,
    )
    consts = dict(
        BLOCK_M=block_m, BLOCK_D=block_d, RP=rp,
        GATE_LOGIT=gate_logit, HAS_ROWS=rows is not None, HAS_THRESH=threshold is not None,
        HAS_DGATE=dgate is not None, DETERMINISTIC=deterministic, PREC=_precision(h),
    )
    return (n_progs,), args, consts, warps, ws


def backward_2d(
    h: torch.Tensor,
    dout: torch.Tensor,
    dgate: Optional[torch.Tensor],
    ag: torch.Tensor,
    rot: torch.Tensor,
    bias: torch.Tensor,
    logit: Optional[torch.Tensor],
    rows: Optional[torch.Tensor],
    threshold: Optional[float],
    deterministic: bool = False,
    dh: Optional[torch.Tensor] = None,
    alias_ok: bool = False,
) -> dict[str, torch.Tensor]:
    """Launch the backward kernel; returns {dh (h.dtype), dA (= dW), dR, db, dwg, dc, dlogit} (fp32).

    dA is d/dA of A = W - R: dW = dA and dR = (s p)^T y - dA (accumulated as such by the kernel). `dgate` [n]
    fp32 is the gate output's gradient. dA, dR, db, dwg and dc are views of one workspace (disjoint parts) when `alias_ok`, else copies (a custom op
    must not return outputs that alias each other).
    """
    n, d = h.shape
    r = rot.shape[0]
    gate_logit = logit is not None
    if dh is None:
        dh = torch.empty((n, d), dtype=h.dtype, device=h.device)
    dlogit = torch.empty((n,), dtype=torch.float32, device=h.device) if gate_logit else None
    grid, args, consts, warps, ws = _bwd_launch(h, dout, dgate, ag, rot, bias, logit, rows, threshold,
                                                deterministic, dh, dlogit)
    n_progs = grid[0] if deterministic else 1
    if n > 0:
        _kernel("bwd", _interpreting(h))[grid](*args, **consts, num_warps=warps)
    else:
        ws.zero_()
    n_ag = r + (0 if gate_logit else 1)
    n_ws = (n_ag + r) * d
    rp = consts["RP"]
    if n_progs > 1:  # fixed-order reduction over programs
        ws = torch.cat([ws[: n_progs * n_ws].view(n_progs, n_ws).sum(0), ws[n_progs * n_ws:].view(n_progs, rp).sum(0)])
    # [dA | dw_g | dR | db | dc | padding] in one call (views; each separate slice costs host time)
    sizes = [r * d, r * d, r, rp - r] if gate_logit else [r * d, d, r * d, r, 1, rp - n_ag]
    parts = ws.split_with_sizes(sizes)
    d_a = parts[0].view(r, d)
    keep = (lambda t: t) if alias_ok else torch.clone
    if gate_logit:
        d_r, db, dwg, dc = parts[1], parts[2], None, None
    else:
        d_r, db, dwg, dc = parts[2], parts[3], keep(parts[1]), keep(parts[4])
    return {"dh": dh, "dA": keep(d_a), "dR": keep(d_r.view(r, d)), "db": keep(db), "dwg": dwg, "dc": dc,
            "dlogit": dlogit}


def __getattr__(name: str):
    """The differentiable entry points moved to ops.py; `gated_loreft.gated_loreft_triton` etc. still work."""
    if name in ("forward_folded", "gated_loreft_triton", "gated_loreft_logit_triton"):
        from grun_fast.kernels import ops

        return getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
