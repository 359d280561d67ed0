"""Losses against hand computations: pure-Python loops over nested lists, and a few numbers by hand."""
import math

import pytest
import torch

from fullrange.losses import ce_loss, full_range_loss, skd_loss, student_loss, tet_loss


def softmax(v, tau=1.0):
    m = max(v)
    e = [math.exp((a - m) / tau) for a in v]
    s = sum(e)
    return [a / s for a in e]


def ce(v, y):
    return -math.log(softmax(v)[y])


def kl(target, v, tau):
    p, q = softmax(target, tau), softmax(v, tau)
    return tau * tau * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def mean(xs):
    return sum(xs) / len(xs)


def reference_full_range(z, y, za, alpha, beta, tau, sd_target):
    T, B = len(z), len(z[0])
    C = len(z[0][0])
    twce = mean([mean([ce(z[t][b], y[b]) for b in range(B)]) for t in range(T)])
    twkl = mean([mean([kl(za[b], z[t][b], tau) for b in range(B)]) for t in range(T)])
    targets = []
    for b in range(B):
        if sd_target == "ensemble":
            targets.append([mean([z[t][b][c] for t in range(T)]) for c in range(C)])
        else:
            good = [t for t in range(T) if max(range(C), key=lambda c: z[t][b][c]) == y[b]]
            targets.append([mean([z[t][b][c] for t in good]) if good else 0.0 for c in range(C)])
    twsd = mean([mean([kl(targets[b], z[t][b], tau) for b in range(B)]) for t in range(T)])
    return twce + alpha * twkl + beta * twsd, twce, twkl, twsd


def test_twce_by_hand():
    z = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # T=2, B=1, C=2
    loss, parts = tet_loss(z, torch.tensor([0]))
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2  # 1.2200948...
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.2200948, abs=1e-6)


def test_twkl_by_hand():
    # teacher equals step 1, step 2 is uniform: KL(p || p) = 0, KL(p || u) = sum p log(p C)
    z = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
    za = torch.tensor([[2.0, 0.0]])
    p = [math.exp(2) / (1 + math.exp(2)), 1 / (1 + math.exp(2))]
    kl_u = sum(pi * math.log(pi * 2) for pi in p)
    _, parts = full_range_loss(z, torch.tensor([0]), za, tau=1.0)
    assert parts["twkl"].item() == pytest.approx(kl_u / 2, abs=1e-6)


@pytest.mark.parametrize("sd_target", ["ensemble", "correct_only"])
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_full_range_matches_reference(sd_target, tau):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 5, 6, generator=g) * 2
    y = torch.randint(0, 6, (5,), generator=g)
    za = torch.randn(5, 6, generator=g) * 2
    z[:, 0] = 0.0
    z[:, 0, 1] = 1.0  # sample 0 is never correct unless its label is 1
    y[0] = 3
    loss, parts = full_range_loss(z, y, za, alpha=0.2, beta=0.5, tau=tau, sd_target=sd_target)
    ref, twce, twkl, twsd = reference_full_range(z.tolist(), y.tolist(), za.tolist(), 0.2, 0.5, tau, sd_target)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert parts["twce"].item() == pytest.approx(twce, rel=1e-5)
    assert parts["twkl"].item() == pytest.approx(twkl, rel=1e-5)
    assert parts["twsd"].item() == pytest.approx(twsd, rel=1e-5)


def test_correct_only_zero_target_pushes_to_uniform():
    z = torch.tensor([[[0.0, 3.0, 0.0]], [[0.0, 1.0, 0.0]]])  # label 0 never the argmax
    _, parts = full_range_loss(z, torch.tensor([0]), torch.zeros(1, 3), tau=1.0, sd_target="correct_only")
    expected = mean([sum((1 / 3) * (math.log(1 / 3) - math.log(q)) for q in softmax(v)) for v in ([0, 3, 0], [0, 1, 0])])
    assert parts["twsd"].item() == pytest.approx(expected, rel=1e-6)


def test_sd_target_is_detached():
    z = torch.randn(3, 4, 5, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    _, parts = full_range_loss(z, y, torch.randn(4, 5), alpha=0.0, beta=1.0)
    # gradient of TWSD alone, with the target held constant, equals autograd of the loss's TWSD
    target = z.detach().mean(0)
    logp = torch.log_softmax(z, -1)
    p_t = torch.softmax(target, -1)
    manual = (p_t * (torch.log(p_t) - logp)).sum(-1).mean()
    g_manual, = torch.autograd.grad(manual, z)
    loss, _ = full_range_loss(z, y, torch.randn(4, 5), alpha=0.0, beta=1.0)
    ce_part = torch.nn.functional.cross_entropy(z.flatten(0, 1), y.repeat(3))
    g_loss, = torch.autograd.grad(loss - ce_part, z)
    assert torch.allclose(g_loss, g_manual, atol=1e-6)


def test_skd_and_ce_by_reference():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 5, generator=g)
    y = torch.randint(0, 5, (4,), generator=g)
    za = torch.randn(4, 5, generator=g)
    zl, yl, zal = z.tolist(), y.tolist(), za.tolist()
    ens = [[mean([zl[t][b][c] for t in range(3)]) for c in range(5)] for b in range(4)]
    ce_ens = mean([ce(ens[b], yl[b]) for b in range(4)])
    kd = mean([kl(zal[b], ens[b], 2.0) for b in range(4)])
    loss, parts = skd_loss(z, y, za, alpha=0.3, tau=2.0)
    assert loss.item() == pytest.approx(ce_ens + 0.3 * kd, rel=1e-5)
    assert ce_loss(z, y)[0].item() == pytest.approx(ce_ens, rel=1e-5)


def test_dispatch_and_errors():
    z, y, za = torch.randn(2, 3, 4), torch.tensor([0, 1, 2]), torch.randn(3, 4)
    a = student_loss("full_range", z, y, za, 0.2, 0.5, 1.0, "ensemble")[0]
    assert a.item() == pytest.approx(full_range_loss(z, y, za)[0].item())
    with pytest.raises(ValueError, match="needs teacher"):
        student_loss("skd", z, y, None, 0.2, 0.5, 1.0, "ensemble")
    with pytest.raises(ValueError, match="loss kind"):
        student_loss("nope", z, y, za, 0.2, 0.5, 1.0, "ensemble")
    with pytest.raises(ValueError, match=r"\[T, B, C\]"):
        full_range_loss(torch.randn(3, 4), y, za)
    with pytest.raises(ValueError, match="sd_target"):
        full_range_loss(z, y, za, sd_target="bad")

