"""GatedLoReFT: orthonormal R, cached inference, training keeps R orthonormal (GRUN.md section 8 trap)."""
import pytest
import torch

from grun_fast import GatedLoReFT, GRUNError, reference


def test_rotation_is_orthonormal_and_forward_matches_reference():
    torch.manual_seed(0)
    module = GatedLoReFT(40, rank=5)
    R = module.orthonormal_rotation()
    assert torch.allclose(R @ R.T, torch.eye(5), atol=1e-5)
    h = torch.randn(3, 40)
    out, gate = module(h)
    ref_out, ref_gate = reference.gated_loreft(
        h.double(), R.double(), module.weight.double(), module.bias.double(),
        module.gate.weight.double().reshape(-1), module.gate.bias.double(),
    )
    assert torch.allclose(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    assert torch.equal(module.last_gate, gate)


def test_inference_cache_is_rebuilt_when_a_parameter_changes():
    module = GatedLoReFT(16, rank=2)
    h = torch.randn(4, 16)
    with torch.no_grad():
        first, _ = module(h)
        cached = module.folded(h.dtype, h.device)
        again, _ = module(h)
        assert module.folded(h.dtype, h.device) is cached and torch.equal(first, again)
        module.weight.add_(1.0)
        changed, _ = module(h)
        assert module.folded(h.dtype, h.device) is not cached
    assert not torch.equal(first, changed)
    with torch.no_grad():
        module.weight.sub_(1.0)
        assert torch.allclose(module(h)[0], first, atol=1e-6)


@pytest.mark.parametrize("gate", ["linear", "mlp"])
def test_rotation_stays_orthonormal_under_adamw_with_weight_decay(gate):
    torch.manual_seed(1)
    module = GatedLoReFT(32, rank=4, gate=gate, gate_hidden=(8, 4))
    opt = torch.optim.AdamW(module.parameters(), lr=4e-3)  # default weight decay 0.01: the trap
    h = torch.randn(16, 32)
    for _ in range(5):
        out, gate_values = module(h)
        loss = out.pow(2).mean() + gate_values.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    R = module.orthonormal_rotation()
    assert R.abs().sum() > 0
    assert torch.allclose(R @ R.T, torch.eye(4), atol=1e-5)
    assert module.rotation.grad is not None and module.rotation.grad.abs().sum() > 0


def test_mlp_gate_logit_path():
    torch.manual_seed(2)
    module = GatedLoReFT(24, rank=3, gate="mlp", gate_hidden=(16, 8))
    h = torch.randn(5, 24)
    out, gate = module(h)
    expected_gate = torch.sigmoid(module.gate(h).squeeze(-1))
    assert torch.allclose(gate, expected_gate, atol=1e-6)
    with torch.no_grad():
        out_cached, _ = module(h)
    assert torch.allclose(out, out_cached, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank"), ({"rank": 17}, "rank"), ({"rank": 2.0}, "rank"), ({"gate": "conv"}, "gate"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(GRUNError, match=match):
        GatedLoReFT(16, **kwargs)


def test_module_made_under_inference_mode_serves_and_follows_updates():
    """Serving code loads adapters inside torch.inference_mode: parameters are then inference tensors with
    no version counter, so nothing may be cached on one (an in-place update must still be seen)."""
    h = torch.randn(3, 16)
    with torch.inference_mode():
        torch.manual_seed(5)
        module = GatedLoReFT(16, rank=2)
        first, _ = module(h)
        module.weight.add_(1.0)  # allowed on inference tensors inside inference mode
        changed, _ = module(h)
    want, _ = reference.gated_loreft(h.double(), module.orthonormal_rotation().double(), module.weight.double(),
                                     module.bias.double(), module.gate.weight.double().reshape(-1),
                                     module.gate.bias.double())
    assert not torch.equal(first, changed)
    assert torch.allclose(changed.double(), want, rtol=1e-5, atol=1e-6)
