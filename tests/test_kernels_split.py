"""The few-row split-d forward (kernels/split_d.py) in the Triton interpreter, against float64.

`gated_loreft.forward_2d` takes it for at most SPLIT_D_MAX_ROWS rows; every case here checks that it did
(the launched kernel names are recorded), writes into NaN-poisoned buffers so an element no program
writes fails, and compares with the four-product float64 reference on fresh random inputs.
"""
from __future__ import annotations

import pytest
import torch

from grun_fast import functional
from grun_fast.kernels import gated_loreft as K
from grun_fast.kernels import split_d
from tests.test_kernels import TOL, make, ref_out, rel


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture
def launched(monkeypatch):
    """Names of the kernels launched during a test."""
    names: list[str] = []
    real = K._kernel

    def spy(name, interpret):
        names.append(name)
        return real(name, interpret)

    monkeypatch.setattr(K, "_kernel", spy)
    return names


def folded(R, W, b, wg, c):
    f = functional.fold(R, W, b, wg, c, torch.float32)
    return f.matrix, f.rotation, f.bias


def threshold_for(gate64: torch.Tensor, n: int) -> float:
    """Between two well-separated gates (some rows edited, some not); one row: alternately above and below."""
    g = gate64.flatten().sort().values
    if len(g) == 1:
        return float(g[0] - 0.05) if n % 4 == 1 else float(g[0] + 0.05)
    i = int((g[1:] - g[:-1]).argmax())
    return float((g[i] + g[i + 1]) / 2)


# rows 1..16; d: non-powers of two, one range boundary inside a tile, one power of two; r 1..9; both gates
CASES = [
    # (rows, d, r, dtype, gate, rows mask?, threshold?, strided h)
    (1, 100, 4, torch.float32, "linear", False, False, False),
    (2, 257, 1, torch.bfloat16, "linear", True, False, False),
    (3, 64, 7, torch.float32, "logit", False, True, False),
    (4, 300, 4, torch.bfloat16, "linear", False, True, True),
    (5, 1000, 2, torch.float32, "linear", True, True, False),
    (6, 129, 9, torch.bfloat16, "logit", True, False, False),
    (7, 48, 4, torch.float32, "linear", False, False, True),
    (8, 512, 3, torch.bfloat16, "linear", True, True, False),
    (9, 96, 4, torch.float32, "logit", False, True, False),
    (10, 333, 5, torch.bfloat16, "linear", False, False, False),
    (11, 200, 1, torch.float32, "linear", True, False, True),
    (12, 77, 4, torch.bfloat16, "logit", False, True, False),
    (13, 160, 8, torch.float32, "linear", False, True, False),
    (14, 250, 4, torch.bfloat16, "linear", True, True, True),
    (15, 72, 2, torch.float32, "logit", True, True, False),
    (16, 640, 4, torch.bfloat16, "linear", True, False, False),
    (1, 333, 7, torch.bfloat16, "linear", False, True, False),
    (16, 1024, 4, torch.float32, "linear", True, True, True),
]


@pytest.mark.parametrize("n,d,r,dtype,gate_kind,use_rows,use_thresh,strided", CASES)
def test_split_forward_matches_float64(n, d, r, dtype, gate_kind, use_rows, use_thresh, strided, launched):
    h, R, W, b, wg, c = make((n,), d, r, dtype, seed=1000 * n + d)
    if strided:  # a row stride other than d: the kernels read through it
        h = torch.cat([h, torch.full_like(h[:, :3], float("nan"))], -1)[:, :d]
        assert h.stride(0) == d + 3
    logit = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 2 if gate_kind == "logit" else None
    logit64 = logit.double() if logit is not None else h.double() @ wg.double() + c.double()
    threshold = threshold_for(torch.sigmoid(logit64), n) if use_thresh else None
    rows = None
    if use_rows:
        rows = torch.rand(n, generator=torch.Generator().manual_seed(d)) < 0.6
        rows[-1] = True
        if n > 1:
            rows[0] = False
    ag, rot, bias = folded(R, W, b, None if logit is not None else wg, None if logit is not None else c)

    out = torch.full((n, d), float("nan"), dtype=dtype)
    gate = torch.full((n,), float("nan"))
    got, got_gate = K.forward_2d(h, ag, rot, bias, logit, None if rows is None else rows.to(torch.int8), threshold,
                                 out=out, gate=gate)
    assert got is out and got_gate is gate
    assert launched == ["split_partial", "split_apply"]
    assert torch.isfinite(out.float()).all() and torch.isfinite(gate).all()  # every element written

    want, want_gate = ref_out(h.double(), R.double(), W.double(), b.double(), logit64, rows, threshold)
    assert rel(out, want) < TOL[dtype], rel(out, want)
    assert rel(gate, want_gate) < TOL[torch.float32], rel(gate, want_gate)  # the gate is fp32 math on any h
    keep = torch.ones(n, dtype=torch.bool) if rows is None else rows.clone()
    if threshold is not None:
        keep &= want_gate >= threshold
    assert torch.equal(out[~keep], h[~keep])  # rows not edited: bit-identical
    if keep.any():
        assert (out[keep] != h[keep]).any()

    again, again_gate = K.forward_2d(h, ag, rot, bias, logit, None if rows is None else rows.to(torch.int8),
                                     threshold)
    assert torch.equal(again, out) and torch.equal(again_gate, gate)  # fixed reduction order: bitwise repeatable


def test_split_in_place_writes_only_edited_rows(launched):
    n, d, r = 12, 300, 4
    h, R, W, b, wg, c = make((n,), d, r, torch.float32, seed=3)
    ag, rot, bias = folded(R, W, b, wg, c)
    rows = torch.zeros(n, dtype=torch.int8)
    rows[2] = rows[9] = 1
    want, _ = K.forward_2d(h, ag, rot, bias, None, rows, None)
    buf = h.clone()
    buf[~rows.bool()] = float("nan")  # in place must leave these alone (and must not read them into edited rows)
    out, _ = K.forward_2d(buf, ag, rot, bias, None, rows, None, out=buf, inplace=True)
    assert out is buf
    assert torch.equal(buf[rows.bool()], want[rows.bool()])
    assert torch.isnan(buf[~rows.bool()]).all()
    assert launched.count("split_apply") == 2


def test_dispatch_rule(launched):
    """<= SPLIT_D_MAX_ROWS rows split d; more rows, or a d too narrow for two ranges, run the row-block kernel."""
    for n, d, want in ((K.SPLIT_D_MAX_ROWS, 200, ["split_partial", "split_apply"]),
                       (K.SPLIT_D_MAX_ROWS + 1, 200, ["fwd"]),
                       (3, 16, ["fwd"])):
        h, R, W, b, wg, c = make((n,), d, 4, torch.float32, seed=n)
        launched.clear()
        K.forward_2d(h, *folded(R, W, b, wg, c), None, None, None)
        assert launched == want, (n, d, launched)


def test_plan_sizes():
    """Ranges tile d exactly once, each a whole number of power-of-two tiles, at most MAX_RANGES of them, and
    launch 2's partial tile stays within its register budget for every rank."""
    for d in (17, 48, 100, 576, 2048, 3584, 4096, 5120, 8192):
        for rp in (16, 32, 64, 128):
            plan = split_d.plan(d, rp, tile_cap=128)
            if plan is None:
                continue
            assert plan.span % plan.block_d == 0 and plan.block_d & (plan.block_d - 1) == 0
            assert (plan.n_ranges - 1) * plan.span < d <= plan.n_ranges * plan.span
            assert 2 <= plan.n_ranges <= split_d.MAX_RANGES
            assert plan.n_ranges * split_d.BLOCK_M * rp <= split_d.WS_TILE_ELEMS
    assert split_d.plan(4096, 16, 128) == split_d.SplitPlan(128, 128, 32)  # d = 4096, r = 4: 32 programs


def test_public_op_few_rows_matches_row_kernel():
    """Through the public op (inference and the differentiable custom op): the split forward agrees with the
    row-block kernel to fp32 rounding, and gradients still flow."""
    h, R, W, b, wg, c = make((2, 3), 260, 4, torch.float32, seed=7)
    with torch.no_grad():
        split_out, split_gate = functional.gated_loreft(h, R, W, b, wg, c, impl="triton")
        old = K.SPLIT_D_MAX_ROWS
        K.SPLIT_D_MAX_ROWS = 0
        try:
            row_out, row_gate = functional.gated_loreft(h, R, W, b, wg, c, impl="triton")
        finally:
            K.SPLIT_D_MAX_ROWS = old
    assert rel(split_out, row_out) < 1e-6 and rel(split_gate, row_gate) < 1e-6
    leaves = [t.clone().requires_grad_() for t in (h, R, W, b, wg, c)]
    out, gate = functional.gated_loreft(*leaves, impl="triton")
    assert torch.equal(out, split_out) and torch.equal(gate, split_gate)
    (out.sum() + gate.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_split_kernels_compile_for_sm90_without_spills():
    """Both split launches lower to sm_90 machine code with Triton's bundled ptxas (no GPU needed), no spills."""
    aot = pytest.importorskip("grun_fast.kernels.aot")
    try:
        built = [c for rows in (1, 16) for dtype in (torch.bfloat16, torch.float32)
                 for c in aot.compile_split_forward(rows, 4096, 4, dtype, 90, masked=True, threshold=True)]
    except (ImportError, FileNotFoundError, RuntimeError) as err:  # no NVIDIA backend / ptxas in this build
        if "ptxas" in str(err) or "backend" in str(err).lower():
            pytest.skip(f"cannot compile for sm_90 here: {err}")
        raise
    assert len(built) == 8
    for compiled in built:
        usage = compiled.resources()
        assert usage["stack"] == 0 and usage["local"] == 0, (compiled.name, compiled.config, usage)
