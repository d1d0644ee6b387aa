"""The PyTorch path of the op against the plain-math reference (float64 oracle, fresh random inputs)."""
import pytest
import torch

from grun_fast import functional, reference
from grun_fast.errors import GRUNError
from grun_fast.module import orthonormalize

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}


def params(d, r, dtype=torch.float32, gen=None):
    rotation = orthonormalize(torch.randn(r, d, dtype=torch.float64, generator=gen)).to(dtype)
    weight = torch.randn(r, d, dtype=dtype, generator=gen) / d**0.5
    bias = torch.randn(r, dtype=dtype, generator=gen)
    gate_weight = torch.randn(d, dtype=dtype, generator=gen) / d**0.5
    gate_bias = torch.randn((), dtype=dtype, generator=gen)
    return rotation, weight, bias, gate_weight, gate_bias


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,d,r", [((5,), 123, 1), ((2, 7), 64, 4), ((3, 1), 160, 7)])
def test_forward_matches_float64_reference(dtype, shape, d, r):
    h = torch.randn(*shape, d)
    p = params(d, r)
    ref_out, ref_gate = reference.gated_loreft(h.double(), *[t.double() for t in p])
    out, gate = functional.gated_loreft(h.to(dtype), *p, impl="torch")
    assert out.dtype == dtype and out.shape == h.shape and gate.shape == shape and gate.dtype == torch.float32
    assert rel(out, ref_out) < TOL[dtype]
    assert rel(gate, ref_gate) < TOL[dtype]


def test_gradients_match_reference():
    h = torch.randn(4, 6, 40, dtype=torch.float64, requires_grad=True)
    p = [t.double().requires_grad_() for t in params(40, 3)]
    out, gate = functional.gated_loreft(h, *p, impl="torch")
    y, g = torch.randn_like(out), torch.randn_like(gate)
    grads = torch.autograd.grad((out * y).sum() + (gate * g).sum(), [h, *p])
    ref_out, ref_gate = reference.gated_loreft(h, *p)
    ref = torch.autograd.grad((ref_out * y).sum() + (ref_gate * g).sum(), [h, *p])
    for mine, theirs in zip(grads, ref):
        assert rel(mine, theirs) < 1e-10


def test_gradcheck_float64():
    h = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    p = tuple(t.double().requires_grad_() for t in params(9, 2))
    assert torch.autograd.gradcheck(lambda *a: functional.gated_loreft(*a, impl="torch"), (h, *p))


def test_rows_outside_mask_and_below_threshold_are_bit_identical():
    h = torch.randn(6, 5, 32)
    rows = torch.rand(6, 5) > 0.5
    p = params(32, 4)
    threshold = functional.gated_loreft(h, *p, impl="torch")[1].median().item()  # about half the rows open
    out, gate = functional.gated_loreft(h, *p, rows=rows, gate_threshold=threshold, impl="torch")
    kept = ~rows | (gate < threshold)
    assert torch.equal(out[kept], h[kept])
    edited = ~kept
    assert edited.any()
    ref_out, _ = reference.gated_loreft(h.double(), *[t.double() for t in p])
    assert rel(out[edited], ref_out[edited]) < 1e-5


def test_logit_variant_matches_reference():
    h = torch.randn(7, 50)
    rotation, weight, bias, _, _ = params(50, 4)
    logit = torch.randn(7)
    out, gate = functional.gated_loreft_logit(h, rotation, weight, bias, logit, impl="torch")
    ref_out, ref_gate = reference.gated_loreft_logit(h.double(), rotation.double(), weight.double(), bias.double(), logit.double())
    assert rel(out, ref_out) < 1e-5 and rel(gate, ref_gate) < 1e-6


def test_bad_impl_is_rejected(monkeypatch):
    h = torch.randn(2, 8)
    with pytest.raises(ValueError, match="unknown impl"):
        functional.gated_loreft(h, *params(8, 2), impl="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        functional.gated_loreft(h, *params(8, 2), impl="triton")
    monkeypatch.setenv(functional.IMPL_ENV, "bogus")
    with pytest.raises(ValueError, match="GRUN_FAST_IMPL"):
        functional.gated_loreft(h, *params(8, 2))


@pytest.mark.parametrize("gate", ["linear", "mlp"])
def test_triton_dispatch_matches_torch_path(monkeypatch, gate):
    """functional and the module route impl="triton" to the kernels (interpreted on CPU) with the same math."""
    from grun_fast import GatedLoReFT

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(4)
    module = GatedLoReFT(36, rank=3, gate=gate, gate_hidden=(8, 4))
    h = torch.randn(2, 5, 36, requires_grad=True)
    results = {}
    for impl in ("torch", "triton"):
        module.zero_grad()
        h.grad = None
        out, gate_values = module(h, impl=impl)
        (out * torch.linspace(-1, 1, 36)).sum().backward(inputs=[h, *module.parameters()])
        results[impl] = (out.detach(), gate_values.detach(), h.grad.clone(), [p.grad.clone() for p in module.parameters()])
        with torch.no_grad():
            cached, _ = module(h, impl=impl)
        torch.testing.assert_close(cached, out.detach(), rtol=1e-5, atol=1e-5)
    (o1, g1, dh1, dp1), (o2, g2, dh2, dp2) = results["torch"], results["triton"]
    assert rel(o2, o1) < 1e-5 and rel(g2, g1) < 1e-5 and rel(dh2, dh1) < 1e-5
    for a, b in zip(dp2, dp1):
        assert rel(a, b) < 1e-4


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_rows_mask_is_validated_the_same_on_every_path(monkeypatch, impl):
    """A float mask is rejected (the PyTorch path used to apply it as a weight), a wrong shape is named."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    h = torch.randn(3, 4, 16)
    p = params(16, 2)
    with pytest.raises(GRUNError, match="bool"):
        functional.gated_loreft(h, *p, rows=torch.ones(3, 4), impl=impl)
    with pytest.raises(GRUNError, match=r"rows must have shape \(3, 4\)"):
        functional.gated_loreft(h, *p, rows=torch.ones(4, 3, dtype=torch.bool), impl=impl)
    with pytest.raises(GRUNError, match="gate_threshold"):
        functional.gated_loreft(h, *p, gate_threshold="abc", impl=impl)
    rows = torch.tensor([[1, 0, 0, 2]] * 3)  # integer masks: nonzero = edit
    out, _ = functional.gated_loreft(h, *p, rows=rows, impl=impl)
    assert torch.equal(out[:, 1:3], h[:, 1:3]) and not torch.equal(out[:, 0], h[:, 0])


def test_inference_and_training_paths_agree():
    """No autograd: the parameters are folded once and the folded forward runs; with autograd the same
    math runs differentiably. Both give the same numbers."""
    h = torch.randn(5, 3, 40)
    p = [t.clone().requires_grad_() for t in params(40, 3)]
    trained, gate_t = functional.gated_loreft(h, *p, impl="torch")
    with torch.no_grad():
        inferred, gate_i = functional.gated_loreft(h, *p, impl="torch")
    assert trained.requires_grad and not inferred.requires_grad
    assert torch.equal(trained.detach(), inferred) and torch.equal(gate_t.detach(), gate_i)
