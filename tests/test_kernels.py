"""The fused Triton kernels (kernels/gated_loreft.py) against a float64 reference written here.

The kernels run in the Triton interpreter on CPU. `grun_fast.kernels.gated_loreft` wraps its kernels lazily
(interpreter for CPU tensors, compiler for CUDA tensors), so nothing depends on when triton was first
imported; TRITON_INTERPRET=1 is set only while this module's tests run (it tells the public entry points
to take the kernel path for CPU tensors) and restored afterwards, so other test modules are unaffected.
"""
from __future__ import annotations

import pytest
import torch

from grun_fast import functional
from grun_fast.errors import GRUNError
from grun_fast.kernels import gated_loreft as K

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
NAMES = ("h", "rotation", "weight", "bias", "gate_weight", "gate_bias")


def triton_op(*tensors, rows=None, gate_threshold=None, deterministic=False):
    """The op through its public entry point, forced onto the kernels (linear gate: 6 tensors; logit: 5)."""
    fn = functional.gated_loreft if len(tensors) == 6 else functional.gated_loreft_logit
    return fn(*tensors, rows, gate_threshold=gate_threshold, impl="triton", deterministic=deterministic)


def folded(R, W, b, wg, c):
    f = functional.fold(R, W, b, wg, c, torch.float32)
    return f.matrix, f.rotation, f.bias


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    yield
    mp.undo()


# ---- float64 reference: the four products of GRUN.md section 2, literally --------------------------------


def ref_out(h, R, W, b, logit, rows, threshold):
    s = torch.sigmoid(logit)
    edited = h + s.unsqueeze(-1) * ((h @ W.T + b - h @ R.T) @ R)
    keep = torch.ones_like(s, dtype=torch.bool) if rows is None else rows
    if threshold is not None:
        keep = keep & (s >= threshold)
    return torch.where(keep.unsqueeze(-1), edited, h), s


def ref_grads(tensors, logit_fn, rows, threshold, dout, dgate, dtype=torch.float64):
    """Outputs and gradients of sum(out * dout) + sum(gate * dgate) through autograd, in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out, s = ref_out(*leaves[:4], logit_fn(leaves), rows, threshold)
    ((out * dout.to(dtype)).sum() + (s * dgate.to(dtype)).sum()).backward()
    return out.detach(), s.detach(), [t.grad for t in leaves]


def grad_tolerances(tensors, logit_fn, rows, threshold, dout, dgate, want, tol):
    """Per-gradient tolerance: `tol` relative to the larger of the gradient and the sum of the absolute
    per-row contributions to it. A parameter gradient is a sum over rows that can cancel (the gate bias
    gradient sum_i da_i may be 1e-4 of sum_i |da_i|); fp32 rounding is relative to the terms, not to
    what is left after cancellation. Without cancellation this is plain relative error."""
    t = [x.detach().double() for x in tensors]
    h, R, W, b = t[:4]
    s = torch.sigmoid(logit_fn(t))
    keep = torch.ones_like(s, dtype=torch.bool) if rows is None else rows.clone()
    if threshold is not None:
        keep &= s >= threshold
    k = keep.double()
    y, g = dout.double(), dgate.double()
    p = h @ (W - R).T + b
    q = y @ R.T
    da = (((q * p).sum(-1) * k).abs() + g.abs()) * s * (1 - s)  # |da| bound per row
    dp, sp = (q * (s * k).unsqueeze(-1)).abs(), (p * (s * k).unsqueeze(-1)).abs()
    ha, ya = h.abs().reshape(-1, h.shape[-1]), y.abs().reshape(-1, h.shape[-1])
    dp2, sp2, da2 = dp.reshape(-1, dp.shape[-1]), sp.reshape(-1, sp.shape[-1]), da.reshape(-1)
    scales = [
        y.abs() + dp @ (W - R).abs() + (da.unsqueeze(-1) * t[4].abs().reshape(-1) if len(t) == 6 else 0),  # dh
        sp2.T @ ya + dp2.T @ ha,  # dR
        dp2.T @ ha,  # dW
        dp2.sum(0),  # db
    ]
    if len(t) == 6:
        scales += [(da2 @ ha).reshape(t[4].shape), da2.sum().reshape(t[5].shape)]  # dw_g, dc
    else:
        scales += [da]  # d logit: per row, no sum
    return [tol * max(1.0, sc.norm().item() / w.norm().clamp_min(1e-300).item()) for sc, w in zip(scales, want)]


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(shape, d, r, dtype, param_dtype=torch.float32, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    h = torch.randn(*shape, d, generator=g).to(dtype)
    R = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64, generator=g))[0].T.contiguous()
    W = torch.randn(r, d, generator=g) / d**0.5 + R.float()
    b = torch.randn(r, generator=g)
    wg = 3 * torch.randn(d, generator=g) / d**0.5
    c = torch.randn((), generator=g) * 0.5
    return h, R.to(param_dtype), W.to(param_dtype), b.to(param_dtype), wg.to(param_dtype), c.to(param_dtype)


def safe_threshold(gate: torch.Tensor) -> float:
    """A threshold halfway between two well-separated gate values (no row sits on the boundary)."""
    g = gate.flatten().sort().values
    gaps = g[1:] - g[:-1]
    mid = len(g) // 2
    i = mid + int(gaps[mid - len(g) // 4: mid + len(g) // 4].argmax()) - len(g) // 4
    return float((g[i] + g[i + 1]) / 2)


# ---- linear gate -----------------------------------------------------------------------------------------

CASES = [
    # (leading shape, d, r, dtype, rows mask?, threshold?, deterministic, non-contiguous h)
    ((37,), 123, 4, torch.float32, True, False, False, False),
    ((4, 16), 160, 7, torch.float32, False, True, True, True),
    ((1,), 96, 1, torch.float32, False, False, False, False),
    ((33,), 80, 4, torch.bfloat16, True, True, False, False),
    ((2, 9), 48, 4, torch.float16, True, False, True, False),
    ((5,), 600, 4, torch.bfloat16, True, False, True, False),  # <= 16 rows: 512-wide tiles, 16 warps
]


@pytest.mark.parametrize("shape,d,r,dtype,use_rows,use_thresh,det,noncontig", CASES)
def test_linear_gate_matches_float64(shape, d, r, dtype, use_rows, use_thresh, det, noncontig):
    h, R, W, b, wg, c = make(shape, d, r, dtype)
    if noncontig:  # same values in padded rows: the kernel must honour the row stride (a view, no copy)
        h = torch.cat([h, torch.full_like(h[..., :5], float("nan"))], -1)[..., :d]
        assert not h.is_contiguous() and h.reshape(-1, d).stride(0) == d + 5
    rows = (torch.rand(shape) < 0.7) if use_rows else None
    if rows is not None:
        rows.view(-1)[0], rows.view(-1)[-1] = False, True
    gate64 = torch.sigmoid(h.double() @ wg.double() + c.double())
    threshold = safe_threshold(gate64) if use_thresh else None
    dout = torch.randn(*shape, d).to(dtype)
    dgate = torch.randn(shape)

    leaves = [t.clone().requires_grad_() for t in (h, R, W, b, wg, c)]
    out, gate = triton_op(*leaves, rows=rows, gate_threshold=threshold, deterministic=det)
    assert out.dtype == dtype and out.shape == h.shape
    assert gate.dtype == torch.float32 and gate.shape == shape
    with torch.no_grad():  # inference: parameters folded once, the same forward kernel, no custom op
        inf_out, inf_gate = triton_op(h, R, W, b, wg, c, rows=rows, gate_threshold=threshold)
    assert torch.equal(inf_out, out) and torch.equal(inf_gate, gate)
    ((out.float() * dout.float()).sum() + (gate * dgate).sum()).backward()

    r_out, r_gate, r_grads = ref_grads(
        (h, R, W, b, wg, c), lambda t: t[0] @ t[4] + t[5], rows, threshold, dout, dgate
    )
    tol = TOL[dtype]
    assert rel(out, r_out) < tol
    assert rel(gate, r_gate) < tol
    tols = grad_tolerances((h, R, W, b, wg, c), lambda t: t[0] @ t[4] + t[5], rows, threshold, dout, dgate,
                           r_grads, tol)
    for name, leaf, want, t in zip(NAMES, leaves, r_grads, tols):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        assert leaf.grad.shape == leaf.shape, name
        assert rel(leaf.grad, want) < t, (name, rel(leaf.grad, want), t)

    keep = torch.ones(shape, dtype=torch.bool) if rows is None else rows.clone()
    if threshold is not None:
        keep &= r_gate >= threshold
        assert 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(out[~keep], h[~keep])  # bit-identical unedited rows
    assert (out[keep] != h[keep]).any()
    assert use_rows == bool((~keep).any()) or use_thresh


# ---- MLP gate: logit given by the caller ------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 4, 7])
def test_logit_gate_matches_float64(r):
    shape, d = (2, 11), 72
    h, R, W, b, _, _ = make(shape, d, r, torch.float32)
    logit = torch.randn(shape) * 2
    rows = torch.rand(shape) < 0.6
    dout, dgate = torch.randn(*shape, d), torch.randn(shape)
    leaves = [t.clone().requires_grad_() for t in (h, R, W, b, logit)]
    out, gate = triton_op(*leaves, rows=rows, deterministic=(r == 4))
    ((out * dout).sum() + (gate * dgate).sum()).backward()
    r_out, r_gate, r_grads = ref_grads((h, R, W, b, logit), lambda t: t[4], rows, None, dout, dgate)
    assert rel(out, r_out) < 1e-5 and rel(gate, r_gate) < 1e-5
    tols = grad_tolerances((h, R, W, b, logit), lambda t: t[4], rows, None, dout, dgate, r_grads, 1e-5)
    for name, leaf, want, t in zip(("h", "rotation", "weight", "bias", "gate_logit"), leaves, r_grads, tols):
        assert rel(leaf.grad, want) < t, (name, rel(leaf.grad, want), t)
    assert torch.equal(out[~rows], h[~rows])


# ---- raw launchers: poisoned buffers, in place, determinism ----------------------------------------------


def test_poisoned_buffers_are_fully_overwritten():
    n, d, r = 45, 100, 4
    h, R, W, b, wg, c = make((n,), d, r, torch.bfloat16)
    ag, rot, bias = folded(R, W, b, wg, c)
    rows = (torch.rand(n) < 0.5).to(torch.int8)
    out = torch.full((n, d), float("nan"), dtype=h.dtype)
    gate = torch.full((n,), float("nan"))
    K.forward_2d(h, ag, rot, bias, None, rows, None, out=out, gate=gate)
    assert torch.isfinite(out.float()).all() and torch.isfinite(gate).all()
    want_out, want_gate = K.forward_2d(h, ag, rot, bias, None, rows, None)
    assert torch.equal(out, want_out) and torch.equal(gate, want_gate)

    dout = torch.randn(n, d).to(h.dtype)
    dh = torch.full((n, d), float("nan"), dtype=h.dtype)
    for det in (False, True):
        g = K.backward_2d(h, dout, None, ag, rot, bias, None, rows, None, deterministic=det, dh=dh)
        assert g["dh"] is dh and torch.isfinite(dh.float()).all()
        assert all(torch.isfinite(g[k]).all() for k in ("dA", "dR", "db", "dwg", "dc"))
        dh.fill_(float("nan"))


def test_inplace_writes_only_edited_rows():
    n, d, r = 40, 64, 4
    h, R, W, b, wg, c = make((n,), d, r, torch.float32)
    ag, rot, bias = folded(R, W, b, wg, c)
    rows = torch.zeros(n, dtype=torch.int8)
    rows[3] = rows[17] = 1  # rows 32..39 (the last block) have no edit at all
    want, want_gate = K.forward_2d(h, ag, rot, bias, None, rows, None)
    buf = h.clone()
    buf[~rows.bool()] = float("nan")  # in place must not touch these
    out, gate = K.forward_2d(buf, ag, rot, bias, None, rows, None, out=buf, inplace=True)
    assert out is buf
    edited = rows.bool()
    assert torch.equal(buf[edited], want[edited])
    assert torch.isnan(buf[~edited]).all()


def test_deterministic_mode_is_bitwise_reproducible():
    shape, d, r = (70,), 96, 4  # 5 row blocks over 2 programs: partials accumulate across blocks
    h, R, W, b, wg, c = make(shape, d, r, torch.float32)
    dout, dgate = torch.randn(*shape, d), torch.randn(shape)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (h, R, W, b, wg, c)]
        out, gate = triton_op(*leaves, deterministic=True)
        ((out * dout).sum() + (gate * dgate).sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, g1, g2 in zip(NAMES, *grads):
        assert torch.equal(g1, g2), name
    args = ((h, R, W, b, wg, c), lambda t: t[0] @ t[4] + t[5], None, None, dout, dgate)
    _, _, want = ref_grads(*args)
    for name, got, w, t in zip(NAMES, grads[0], want, grad_tolerances(*args, want, 1e-5)):
        assert rel(got, w) < t, name


# ---- autograd through the float64 (reference-dispatch) path, torch.compile, errors -----------------------


def test_inputs_the_kernels_do_not_take_go_to_pytorch_or_fail_clearly():
    """float64 and rank > 127 never reach the kernels: impl='triton' says so, impl='auto' runs PyTorch."""
    h, R, W, b, wg, c = make((5,), 7, 2, torch.float64, param_dtype=torch.float64)
    with pytest.raises(GRUNError, match="fp32/bf16/fp16"):
        triton_op(h, R, W, b, wg, c)
    assert functional.resolve_impl("auto", h, 2) == "torch"
    h32 = torch.randn(3, 200)
    with pytest.raises(GRUNError, match="rank <= 127"):
        functional.resolve_impl("triton", h32, 128)
    assert functional.resolve_impl("triton", h32, 127) == "triton"


def test_torch_compile_fullgraph_matches_eager():
    h, R, W, b, wg, c = make((12,), 40, 4, torch.float32)
    rows = torch.rand(12) < 0.5
    dout = torch.randn(12, 40)

    def step(h, R, W, b, wg, c):
        out, gate = triton_op(h, R, W, b, wg, c, rows=rows)
        return (out * dout).sum() + gate.square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (h, R, W, b, wg, c)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for a, e in zip(*results):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-6)


def test_bad_input_is_rejected_before_work():
    h, R, W, b, wg, c = make((4,), 16, 2, torch.float32)
    with pytest.raises(GRUNError, match="rotation"):
        triton_op(h, R[:, :8], W, b, wg, c)
    with pytest.raises(GRUNError, match="weight"):
        triton_op(h, R, W[:1], b, wg, c)
    with pytest.raises(GRUNError, match="gate_weight"):
        triton_op(h, R, W, b, wg[:3], c)
    with pytest.raises(GRUNError, match="rows"):
        triton_op(h, R, W, b, wg, c, rows=torch.ones(5, dtype=torch.bool))
    with pytest.raises(GRUNError, match="bool"):
        triton_op(h, R, W, b, wg, c, rows=torch.ones(4))
    with pytest.raises(GRUNError, match="gate_logit"):
        triton_op(h, R, W, b, torch.zeros(3))


def test_cuda_path_compiles_for_sm90_without_spills():
    """The compiled (non-interpreter) path: lower both kernels to sm_90 machine code on this CPU with
    Triton's bundled ptxas (catches errors the interpreter cannot see) and check nothing spills."""
    aot = pytest.importorskip("grun_fast.kernels.aot")
    try:
        fwd = aot.compile_forward(4096, 4096, 4, torch.bfloat16, 90, masked=True, threshold=True)
        bwd = aot.compile_backward(4096, 4096, 4, torch.bfloat16, 90, masked=True, threshold=True,
                                   deterministic=True)
    except (ImportError, FileNotFoundError, RuntimeError) as err:  # no NVIDIA backend / ptxas in this build
        if "ptxas" in str(err) or "backend" in str(err).lower():
            pytest.skip(f"cannot compile for sm_90 here: {err}")
        raise
    tiny = [build(8, 4096, 4, torch.bfloat16, 90) for build in (aot.compile_forward, aot.compile_backward)]
    for compiled in (fwd, bwd, *tiny):
        usage = compiled.resources()
        assert usage["stack"] == 0 and usage["local"] == 0, (compiled.name, usage)  # no register spills


def test_expanded_upstream_gradients():
    """out.sum() hands the backward a stride-0 gradient; the kernels read it through its strides."""
    h, R, W, b, wg, c = make((3, 5), 40, 3, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (h, R, W, b, wg, c)]
    out, gate = triton_op(*leaves)
    (out.sum() + gate.sum()).backward()
    _, _, want = ref_grads((h, R, W, b, wg, c), lambda t: t[0] @ t[4] + t[5], None, None,
                           torch.ones(3, 5, 40), torch.ones(3, 5))
    tols = grad_tolerances((h, R, W, b, wg, c), lambda t: t[0] @ t[4] + t[5], None, None,
                           torch.ones(3, 5, 40), torch.ones(3, 5), want, 1e-5)
    for name, leaf, w, t in zip(NAMES, leaves, want, tols):
        assert rel(leaf.grad, w) < t, name
