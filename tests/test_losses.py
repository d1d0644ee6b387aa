"""Each loss term against a value worked out by hand on a tiny example."""
import math

import pytest
import torch

from grun_fast.unlearn.losses import (simnpo_loss, answer_nll, gate_bce, gd_forget_loss, gd_forget_loss_from_nll,
                                      idk_forget_loss, idk_forget_loss_from_nll, masked_mse, mean_nll, npo_loss,
                                      retain_kl_loss, retain_loss_from_nll, rmu_control_vector, rmu_forget_loss,
                                      rmu_retain_loss, token_mean_nll, total_loss)

L2 = math.log(2.0)
# Vocabulary of 3. Logits [0, ln 2, 0] give probabilities [1/4, 1/2, 1/4]: NLL(1) = ln 2, NLL(0 or 2) = ln 4.
ROW = [0.0, L2, 0.0]


def example():
    # Two rows of 4 tokens. Logits at t predict the token at t + 1. Labels -100 on prompt and padding.
    logits = torch.tensor([[ROW, ROW, ROW, ROW],
                           [ROW, ROW, [5.0, 5.0, 5.0], ROW]])
    labels = torch.tensor([[-100, -100, 1, 0],      # scored: t=2 (token 1: ln 2), t=3 (token 0: ln 4)
                           [-100, 2, -100, 1]])     # scored: t=1 (token 2: ln 4), t=3 from uniform logits: ln 3
    return logits, labels


def test_answer_nll_by_hand():
    total, count = answer_nll(*example())
    assert count.tolist() == [2, 2]
    assert torch.allclose(total, torch.tensor([L2 + 2 * L2, 2 * L2 + math.log(3)]), atol=1e-6)


def test_token_mean_and_gd_by_hand():
    logits, labels = example()
    expected = (3 * L2 + 2 * L2 + math.log(3)) / 4
    assert token_mean_nll(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert gd_forget_loss(logits, labels).item() == pytest.approx(-expected, abs=1e-6)
    # a global token count (several processes): the local sum over the global count
    assert token_mean_nll(logits, labels, num_tokens=8).item() == pytest.approx(expected * 4 / 8, abs=1e-6)
    assert idk_forget_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_losses_from_row_nll_by_hand():
    # what the trainer calls: per-row summed NLLs over a (global) token count
    s = torch.tensor([3.0, 5.0])
    assert mean_nll(s, 4).item() == 2.0
    assert gd_forget_loss_from_nll(s, torch.tensor(4.0)).item() == -2.0
    assert idk_forget_loss_from_nll(s, 2).item() == 4.0
    zero = torch.zeros(2)
    assert retain_loss_from_nll(s, zero, 16).item() == 0.5
    assert retain_loss_from_nll(s, zero, 0).item() == 8.0          # an empty count is clamped to 1
    # only the excess over the frozen model's NLL counts: row 0 is 1 nat worse, row 1 is better (no credit)
    assert retain_loss_from_nll(s, torch.tensor([2.0, 6.0]), 4).item() == 0.25
    total, count = answer_nll(*example())
    assert gd_forget_loss_from_nll(total, count.sum()).item() == pytest.approx(
        -(5 * L2 + math.log(3)) / 4, abs=1e-6)


def test_gd_gradient_raises_forget_nll():
    logits, labels = example()
    logits = logits.clone().requires_grad_(True)
    gd_forget_loss(logits, labels).backward()
    with torch.no_grad():
        stepped = logits - 0.1 * logits.grad
    assert token_mean_nll(stepped, labels) > token_mean_nll(logits.detach(), labels)


def test_npo_by_hand():
    s = torch.tensor([3.0, 1.0])
    s_ref = torch.tensor([1.0, 2.0])
    beta = 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -(2 / beta) * (math.log(sig(0.5 * 2.0)) + math.log(sig(0.5 * -1.0))) / 2
    assert npo_loss(s, s_ref, beta).item() == pytest.approx(expected, abs=1e-6)
    # at S = S_ref the loss is (2/beta) ln 2
    assert npo_loss(s, s, 0.1).item() == pytest.approx(20 * L2, abs=1e-5)
    with pytest.raises(ValueError, match="beta"):
        npo_loss(s, s_ref, 0.0)


def test_simnpo_by_hand():
    s, n = torch.tensor([6.0, 1.0]), torch.tensor([3, 2])       # mean token NLLs 2.0 and 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -(2 / 2.5) * (math.log(sig(2.5 * 2.0)) + math.log(sig(2.5 * 0.5))) / 2
    assert simnpo_loss(s, n, 2.5).item() == pytest.approx(expected, abs=1e-6)
    gamma = -(2 / 2.5) * (math.log(sig(2.5 * 2.0 - 1.0)) + math.log(sig(2.5 * 0.5 - 1.0))) / 2
    assert simnpo_loss(s, n, 2.5, gamma=1.0).item() == pytest.approx(gamma, abs=1e-6)
    # the same mean NLL gives the same loss whatever the answer's length (NPO's summed NLL would not)
    assert simnpo_loss(torch.tensor([20.0]), torch.tensor([10]), 2.5).item() == pytest.approx(
        simnpo_loss(torch.tensor([2.0]), torch.tensor([1]), 2.5).item(), abs=1e-7)
    with pytest.raises(ValueError, match="beta"):
        simnpo_loss(s, n, 0.0)


def test_npo_gradient_pushes_nll_up_and_fades():
    s = torch.tensor([1.0, 50.0], requires_grad=True)
    npo_loss(s, torch.tensor([1.0, 1.0]), beta=0.1).backward()
    assert (s.grad < 0).all()                       # descending the loss raises S
    assert abs(s.grad[1]) < abs(s.grad[0]) / 10     # and matters little once S >> S_ref


def test_gate_bce_by_hand():
    forget = [torch.tensor([0.9, 0.6]), torch.tensor([0.8, 0.7])]
    retain = [torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.4])]
    terms = [-math.log(p) for p in (0.9, 0.6, 0.8, 0.7)] + [-math.log(1 - p) for p in (0.1, 0.3, 0.2, 0.4)]
    assert gate_bce(forget, retain).item() == pytest.approx(sum(terms) / 8, abs=1e-6)
    assert gate_bce(forget, []).item() == pytest.approx(sum(terms[:4]) / 4, abs=1e-6)
    with pytest.raises(ValueError):
        gate_bce([], [])


def test_rmu_by_hand():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [1.0, 1.0]]])
    mask = torch.tensor([[False, True], [True, True]])
    target = torch.tensor([1.0, 0.0])
    # masked tokens: (3,4): ((2)^2+(4)^2)/2 = 10; (0,0): (1+0)/2 = 0.5; (1,1): (0+1)/2 = 0.5 -> mean 11/3
    assert rmu_forget_loss(h, target, mask).item() == pytest.approx(11 / 3, abs=1e-6)
    base = torch.zeros_like(h)
    # (3,4): 12.5; (0,0): 0; (1,1): 1 -> 13.5 / 3
    assert rmu_retain_loss(h, base, mask).item() == pytest.approx(4.5, abs=1e-6)
    assert masked_mse(h, base, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0
    c = rmu_control_vector(16, coefficient=300.0, seed=1)
    assert c.norm().item() == pytest.approx(300.0, rel=1e-5) and (c >= 0).all()
    assert torch.equal(c, rmu_control_vector(16, 300.0, seed=1))
    assert not torch.equal(c, rmu_control_vector(16, 300.0, seed=2))


def test_total_loss():
    f, r, g = torch.tensor(-2.0), torch.tensor(0.5), torch.tensor(0.1)
    assert total_loss(f, r, g, lambda_r=2.0, lambda_g=10.0).item() == pytest.approx(-2 + 1 + 1)
    assert total_loss(f, r, g, 1.0, 10.0, forget_scale=100.0).item() == pytest.approx(-200 + 0.5 + 1)
    assert total_loss(f, r, g, 2.0, 10.0, kl=torch.tensor(0.25), retain_kl=4.0).item() == pytest.approx(-2 + 1 + 1 + 1)


def test_retain_kl_by_hand():
    """KL(frozen || edited) summed over tokens, over num_tokens; float64 reference on fresh random logits; zero
    where the distributions agree; the gradient reaches the edited side only."""
    g = torch.Generator().manual_seed(7)
    edited = torch.randn(5, 11, generator=g, dtype=torch.float64)
    frozen = torch.randn(5, 11, generator=g, dtype=torch.float64)
    p, q = frozen.softmax(-1), edited.softmax(-1)
    want = sum(float((p[i] * (p[i] / q[i]).log()).sum()) for i in range(5)) / 8
    lq = edited.log_softmax(-1).float().requires_grad_()
    lp = frozen.log_softmax(-1).float().requires_grad_()
    got = retain_kl_loss(lq, lp, 8)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert lp.grad is None and lq.grad.abs().sum() > 0
    assert retain_kl_loss(lp.detach(), lp.detach(), 5).item() == pytest.approx(0.0, abs=1e-6)
