"""The independent LIF reference of the neuron and kernel tests: PAPER.md's multi-step LIF as a
plain per-step loop with autograd, and a Heaviside spike whose backward is the sigmoid
surrogate a * sig(a d) * (1 - sig(a d))."""
import torch


class SurrogateSpike(torch.autograd.Function):
    """d = h - theta [...] -> spikes (d >= 0) in d's dtype; backward: the sigmoid surrogate."""

    @staticmethod
    def forward(ctx, d, alpha):
        ctx.save_for_backward(d)
        ctx.alpha = alpha
        return (d >= 0).to(d.dtype)

    @staticmethod
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        sig = torch.sigmoid(ctx.alpha * d)
        return g * ctx.alpha * sig * (1 - sig), None


def reference_lif(x, decay, theta, reset, alpha, detach_reset):
    """x [T, ...] -> (spikes, h pre-fire, v post-reset), each [T, ...] and in autograd."""
    v = torch.zeros_like(x[0])
    spikes, hs, vs = [], [], []
    for t in range(x.shape[0]):
        h = decay * v + x[t]
        s = SurrogateSpike.apply(h - theta, alpha)
        r = s.detach() if detach_reset else s
        v = h * (1 - r) if reset == "hard" else h - theta * r
        spikes.append(s)
        hs.append(h)
        vs.append(v)
    return torch.stack(spikes), torch.stack(hs), torch.stack(vs)
