"""Few-row (decode) forward of gated LoReFT: the hidden dimension d split across programs.

With 1-16 rows the row-block forward (`gated_loreft._fwd_kernel`) runs ONE program that walks all of d
twice: a chain of ~2 d / BLOCK_D dependent load-and-multiply steps on one SM while the rest of the GPU
idles (34 us for 1 row at d = 4096 on an H200). Here each program owns a d range of `span` columns
(a few tiles) of one 16-row block, so the chain is a few steps long and up to 32 SMs share the work:

    launch 1 (`_split_partial_kernel`, grid = row blocks x d ranges):
        part[j] = h[:, range j] @ ag[:, range j]^T                  fp32 [BLOCK_M, RP] per program
    launch 2 (`_split_apply_kernel`, same grid):
        [p | a] = sum_j part[j] + [b | c]  (fixed order),  s = sigmoid(a),  gate (d range 0 only)
        out[:, range j] = h + (s p) @ R[:, range j]        (h bit-exact on rows not edited)

Why two launches and no atomics: the sum over d ranges must be complete before any program can edit,
and Triton has no grid-wide barrier, so the second launch is the barrier. The partials go to a workspace
`[n_ranges, n_pad, RP]` fp32 that launch 1 writes in full (rows past n and columns past r + 1 as zeros),
so it needs no zero-fill launch, and each program of launch 2 reduces the partials of its rows itself in
a fixed order (one vectorised load of at most n_ranges x 16 x RP fp32 = 32 KiB, from L2): bitwise
reproducible results and no third launch. Atomics into a zeroed buffer would cost a memset launch and
an arbitrary summation order; a "last program reduces" counter still needs a second launch for the edit.

Cost: two launches instead of one (a few microseconds each) against a chain of ~2 d / (n_ranges BLOCK_D)
steps instead of ~2 d / BLOCK_D; `gated_loreft.forward_2d` takes this path for at most SPLIT_D_MAX_ROWS
rows when d spans at least two ranges. Kernels use only Triton builtins (see gated_loreft.py) so the
interpreter runs them for CPU tensors.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton.language as tl

_sum_combine = tl.standard._sum_combine

BLOCK_M = 16  # tl.dot needs >= 16 rows; decode batches of <= 16 rows are one row block
MAX_RANGES = 32  # d ranges per row block: 32 SMs busy at d = 4096 with 128-wide ranges
WS_TILE_ELEMS = 8192  # launch 2 loads n_ranges x BLOCK_M x RP partials at once: <= 64 fp32 a thread at 4 warps
WARPS = 4


def _split_partial_kernel(
    h_ptr, ag_ptr, ws_ptr,
    n, d, n_ag, span,
    stride_hm, stride_hd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr,
):
    """part[j, rows, :] = h[rows, range j] @ ag[:, range j]^T, every element of the [BLOCK_M, RP] tile stored."""
    mb = tl.program_id(0)
    j = tl.program_id(1)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    offs_k = tl.arange(0, RP)
    ag_mask = offs_k < n_ag
    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm
    acc = tl.full([BLOCK_M, RP], 0.0, tl.float32)
    for d0 in range(0, span, BLOCK_D):
        offs_d = j * span + d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d
        h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        agt = tl.load(ag_ptr + offs_k[None, :] * d + offs_d[:, None], mask=ag_mask[None, :] & d_mask[:, None],
                      other=0.0)
        acc = tl.dot(h.to(tl.float32), agt, acc, input_precision=PREC)
    n_pad = tl.num_programs(0) * BLOCK_M
    tl.store(ws_ptr + (j * n_pad + offs_m)[:, None] * RP + offs_k[None, :], acc)


def _split_apply_kernel(
    h_ptr, out_ptr, gate_ptr, ws_ptr,
    rot_ptr, bias_ptr, logit_ptr, rows_ptr,
    n, d, r, span, n_ranges,
    stride_hm, stride_hd, stride_om, stride_od,
    threshold,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr, NR: tl.constexpr,
    GATE_LOGIT: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_THRESH: tl.constexpr, INPLACE: tl.constexpr,
    PREC: tl.constexpr,
):
    """Reduce the partials of this row block over the d ranges, then write `out` on this program's range."""
    mb = tl.program_id(0)
    j = tl.program_id(1)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    offs_k = tl.arange(0, RP)
    if GATE_LOGIT:
        n_ag = r
    else:
        n_ag = r + 1
    ag_mask = offs_k < n_ag
    rot_mask = offs_k < r

    # [p | a] = sum over d ranges (fixed order) + [b | c]
    n_pad = tl.num_programs(0) * BLOCK_M
    offs_j = tl.arange(0, NR)
    part_ptrs = ws_ptr + (offs_j[:, None, None] * n_pad + offs_m[None, :, None]) * RP + offs_k[None, None, :]
    part_mask = (offs_j < n_ranges)[:, None, None] & m_mask[None, :, None] & ag_mask[None, None, :]
    acc = tl.reduce(tl.load(part_ptrs, mask=part_mask, other=0.0), 0, _sum_combine)
    acc += tl.load(bias_ptr + offs_k, mask=ag_mask, other=0.0)[None, :]

    if GATE_LOGIT:
        logit = tl.load(logit_ptr + offs_m, mask=m_mask, other=0.0)
    else:
        logit = tl.reduce(tl.where(offs_k[None, :] == r, acc, 0.0), 1, _sum_combine)
    s = 1.0 / (1.0 + tl.exp(-logit))
    tl.store(gate_ptr + offs_m, s, mask=m_mask & ((offs_m * 0 + j) == 0))  # one writer per row

    edit = m_mask
    if HAS_ROWS:
        edit = edit & (tl.load(rows_ptr + offs_m, mask=m_mask, other=0) != 0)
    if HAS_THRESH:
        edit = edit & (s >= threshold)
    sp = tl.where(edit[:, None] & rot_mask[None, :], acc * s[:, None], 0.0)

    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm
    o_rows = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om
    if INPLACE:
        todo = edit
    else:
        todo = m_mask
    n_todo = tl.reduce(todo.to(tl.int32), 0, _sum_combine)
    if n_todo > 0:
        for d0 in range(0, span, BLOCK_D):
            offs_d = j * span + d0 + tl.arange(0, BLOCK_D)
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


KERNEL_FNS = {"split_partial": _split_partial_kernel, "split_apply": _split_apply_kernel}


# Plain-Python integer helpers for the launchers: triton.cdiv and triton.next_power_of_2 are constexpr
# functions that cost ~4 us a call on the host (argument unwrapping), about 9 calls per forward.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1), as triton.next_power_of_2."""
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


class SplitPlan(NamedTuple):
    """Tiles of the split forward: BLOCK_D columns per step, `span` columns (a multiple) per program."""

    block_d: int
    span: int
    n_ranges: int


@functools.lru_cache(maxsize=1024)  # pure; memoised because it runs on every few-row call (host time)
def plan(d: int, rp: int, tile_cap: int, block_d: Optional[int] = None) -> Optional[SplitPlan]:
    """How d splits for accumulator width `rp`, or None when it would be one range (nothing to split).

    At most MAX_RANGES ranges, fewer for wide ranks so that launch 2's partial tile stays within
    WS_TILE_ELEMS; the tile is the power of two (>= 16, <= `tile_cap`, the register budget) nearest above
    the range width, and a range is a whole number of tiles."""
    max_ranges = max(1, min(MAX_RANGES, WS_TILE_ELEMS // (BLOCK_M * rp)))
    want = cdiv(d, max_ranges)
    if block_d is None:
        block_d = min(tile_cap, max(16, next_pow2(want)))
    span = block_d * cdiv(want, block_d)
    n_ranges = cdiv(d, span)
    return None if n_ranges < 2 else SplitPlan(block_d, span, n_ranges)


def launches(h, ag, rot, bias, logit, rows, threshold, out, gate, inplace, split: SplitPlan, rp: int, prec: str,
             warps: int = WARPS) -> tuple[torch.Tensor, list[tuple[str, tuple, tuple, dict, int]]]:
    """The workspace and the two launches (kernel name, grid, positional args, constexpr kwargs, num_warps)."""
    n, d = h.shape
    r = rot.shape[0]
    gate_logit = logit is not None
    row_blocks = cdiv(n, BLOCK_M)
    grid = (row_blocks, split.n_ranges)
    ws = torch.empty((split.n_ranges, row_blocks * BLOCK_M, rp), dtype=torch.float32, device=h.device)
    partial = (
        (h, ag, ws, n, d, r + (0 if gate_logit else 1), split.span, h.stride(0), h.stride(1)),
        dict(BLOCK_M=BLOCK_M, BLOCK_D=split.block_d, RP=rp, PREC=prec),
    )
    apply = (
        (h, out, gate, ws, rot, bias, logit if gate_logit else bias, rows if rows is not None else bias,
         n, d, r, split.span, split.n_ranges, h.stride(0), h.stride(1), out.stride(0), out.stride(1),
         float(threshold) if threshold is not None else 0.0),
        dict(BLOCK_M=BLOCK_M, BLOCK_D=split.block_d, RP=rp, NR=next_pow2(split.n_ranges),
             GATE_LOGIT=gate_logit, HAS_ROWS=rows is not None, HAS_THRESH=threshold is not None, INPLACE=inplace,
             PREC=prec),
    )
    return ws, [("split_partial", grid, *partial, warps), ("split_apply", grid, *apply, warps)]
