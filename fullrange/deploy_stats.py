"""Deployment statistics at every T' from the sweep's single forward pass at T_max.

Per timestep t and per sample, forward hooks count
  - spikes of every LIF module (firing rate = spikes / neurons),
  - synaptic events of every Conv2d / Linear: for a binary (spike) input, the number of
    accumulates (AC) is sum over input spikes of their fan-out (the output units they reach,
    honouring stride, padding, dilation and groups); for any other input (the analog image,
    a real-valued residual stream, average-pooled rates) the layer does dense multiply-
    accumulates (MAC) = output elements x fan-in,
and, after the logits, where each sample would stop under confidence-based early exit.
The network is causal in time at inference, so prefix sums over t give the statistics of a
deployment with T' steps; all counts are integers, summed over samples, batches and ranks
exactly like the accuracy counts (``fullrange.evaluate.all_reduce_counts``).

A layer counts as AC only if every input it saw in the whole sweep was in {0, 1}; otherwise
all of its operations are MACs (the classification is per layer, not per batch, so it does not
depend on how samples are split over batches or ranks). An input that is a LIF output of the
same forward (or a view of one: flatten, reshape, permute) is binary by construction and is not
re-checked; any other input is checked value by value until the layer is found non-binary.
Biases, BatchNorm, pooling and the neuron updates are not counted (the convention of the SNN
energy papers).

Energy: E = 0.9 pJ x AC + 4.6 pJ x MAC (45 nm CMOS, 32-bit floating point; ENERGY_MODEL).
Hooks exist only inside ``DeployStats.attached`` (the sweep); training never pays for them.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fullrange.models.layers import MergedLIF
from fullrange.neuron import LIF

E_AC_PJ = 0.9
E_MAC_PJ = 4.6
ENERGY_MODEL = {
    "E_AC_pJ": E_AC_PJ,
    "E_MAC_pJ": E_MAC_PJ,
    "source": "M. Horowitz, 'Computing's energy problem (and what we can do about it)', ISSCC 2014: "
              "45 nm CMOS, 32-bit float add 0.9 pJ (AC), float multiply 3.7 pJ + add 0.9 pJ = 4.6 pJ (MAC)",
    "rule": "AC = synaptic events (input spikes x fan-out) of layers whose every input is binary; "
            "MAC = output elements x fan-in of any layer with a non-binary input (image, real-valued "
            "stream, pooled rates); biases, BatchNorm, pooling and neuron updates not counted",
}
EXIT_THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)
"""Confidence thresholds for early exit: 0 stops after 1 step, > 1 never stops early (T_max)."""

SYNAPTIC = (nn.Conv2d, nn.Linear)


def early_exit_steps(prefix: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """prefix-mean logits [T, B, C], thresholds [K] -> 0-based exit step index [K, B].

    A sample stops at the first t whose confidence max softmax(prefix[t]) >= threshold, else at
    the last step.
    """
    conf = prefix.float().softmax(-1).amax(-1)  # [T, B]
    reached = conf.unsqueeze(0) >= thresholds.to(conf.device, torch.float32).view(-1, 1, 1)
    reached[:, -1] = True
    return reached.to(torch.int32).argmax(1).long()  # first maximum: the first step that reaches


def _fanout_map(conv: nn.Conv2d, H: int, W: int) -> torch.Tensor:
    """[H, W] float64: how many output positions each input pixel feeds (per output channel).

    The gradient of sum(conv(x, ones)) with respect to x: exact for any stride, padding,
    padding mode and dilation.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.ones(1, 1, H, W, dtype=torch.float64, requires_grad=True)
        w = torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64)
        if conv.padding_mode != "zeros":
            y = F.conv2d(F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), w,
                         None, conv.stride, 0, conv.dilation)
        else:
            y = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation)
        (grad,) = torch.autograd.grad(y.sum(), x)
    return grad[0, 0]


def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns a view's memory (a view of a view points to the first base)."""
    return t._base if t._base is not None else t


def _exact_sum(x: torch.Tensor, dims: tuple[int, ...], per_sample: int) -> torch.Tensor:
    """Per-sample sums of 0/1 values, exact: float32 accumulation while a sum stays below 2^24."""
    return x.sum(dim=dims, dtype=torch.float32 if per_sample < 2 ** 24 else torch.float64).double()


def _fan_in(module: nn.Module) -> int:
    """Inputs that feed one output element: MACs per output of a dense layer."""
    if isinstance(module, nn.Conv2d):
        return (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    return module.in_features


class DeployStats:
    """Per-timestep spike and synaptic-operation counters for one model at T timesteps.

    ``counts`` is a flat dict of int64 tensors (keys fixed at construction, identical on every
    rank, so it all-reduces like the accuracy counts):
        spikes:<lif> [T], neurons:<lif> [T]                 spikes and neuron-steps
        events:<layer> [T], macs:<layer> [T]                AC events if binary / dense MACs
        events_exit:<layer> [K], macs_exit:<layer> [K]      the same, summed up to each exit step
        nonbinary:<layer> []                                > 0: the layer saw a non-binary input
        exit_correct [K], exit_steps [K]                    early exit: top-1 correct, steps used
    Usage: ``with stats.attached(model):`` then per batch ``begin_batch(B)``, forward,
    ``end_batch(prefix, top1_hit)``.
    """

    def __init__(self, model: nn.Module, T: int, thresholds: Sequence[float] = EXIT_THRESHOLDS,
                 device: torch.device | str | None = None):
        if device is None:
            device = next(iter(model.parameters()), torch.empty(0)).device
        self.T, self.device = T, torch.device(device)
        self.thresholds = [float(t) for t in thresholds]
        self._th = torch.tensor(self.thresholds, dtype=torch.float32, device=self.device)
        self.lif = {name: m for name, m in model.named_modules() if isinstance(m, LIF)}
        self.syn = {name: m for name, m in model.named_modules() if isinstance(m, SYNAPTIC)}
        K = len(self.thresholds)
        z = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=self.device)  # noqa: E731
        self.counts: dict[str, torch.Tensor] = {"exit_correct": z(K), "exit_steps": z(K)}
        for name in self.lif:
            self.counts[f"spikes:{name}"] = z(T)
            self.counts[f"neurons:{name}"] = z(T)
        for name in self.syn:
            for key, n in (("events", T), ("macs", T), ("events_exit", K), ("macs_exit", K)):
                self.counts[f"{key}:{name}"] = z(n)
            self.counts[f"nonbinary:{name}"] = z(())
        self._fanout: dict[tuple[str, int, int], torch.Tensor] = {}
        self._B = 0
        self._batch: dict[str, torch.Tensor] = {}   # key -> per-sample counts [T, B] this batch
        self._dense: dict[str, int] = {}            # key -> same count for every (t, b) this batch
        self._spike_tensors: dict[int, weakref.ref] = {}  # LIF outputs (view roots) of this batch
        self._known_dense: dict[str, bool] = {}     # layers already seen with a non-binary input

    # ---- hooks -------------------------------------------------------------------------
    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator["DeployStats"]:
        """Count while inside. The stem runs per step meanwhile (model.stem_once off), so its
        convolution's MACs are counted at every step, as a deployed network computes them."""
        handles = []
        once = [(m, m.stem_once) for m in model.modules() if hasattr(m, "stem_once")]
        try:
            for m, _ in once:
                m.stem_once = False
            for name, m in self.lif.items():
                handles.append(m.register_forward_hook(self._lif_hook(name), with_kwargs=True))
            for name, m in self.syn.items():
                handles.append(m.register_forward_hook(self._syn_hook(name)))
            yield self
        finally:
            for h in handles:
                h.remove()
            for m, on in once:
                m.stem_once = on

    def _per_sample(self, t: torch.Tensor) -> torch.Tensor:
        """Per-(t, b) values from a tensor whose leading dims are [T*B] or [T, B] -> [T, B]."""
        return t.reshape(self.T, self._B)

    def _lead(self, x: torch.Tensor) -> int:
        """Number of leading dims that index (t, b): 1 for time-merged [T*B, ...], 2 for [T, B, ...]."""
        if x.shape[0] == self.T * self._B:
            return 1
        if x.dim() >= 2 and tuple(x.shape[:2]) == (self.T, self._B):
            return 2
        raise ValueError(f"DeployStats: cannot map shape {tuple(x.shape)} to T={self.T}, B={self._B}")

    def _add(self, key: str, per_sample: torch.Tensor) -> None:
        """Add per-(t, b) counts (float64 holding integers) to this batch's buffer for ``key``."""
        v = self._per_sample(per_sample.round().long())
        self._batch[key] = v if key not in self._batch else self._batch[key] + v

    def _add_dense(self, key: str, per_sample_step: int) -> None:
        """Add a count that is the same for every sample and step (neurons, dense MACs)."""
        self._dense[key] = self._dense.get(key, 0) + per_sample_step

    def _lif_hook(self, name: str):
        def hook(module, args, kwargs, out):
            lead = 1 if isinstance(module, MergedLIF) else 2
            dims = tuple(range(lead, out.dim()))
            per_sample = out.numel() // (self.T * self._B)
            self._add(f"spikes:{name}", _exact_sum(out, dims, per_sample) if dims else out.double())
            self._add_dense(f"neurons:{name}", per_sample)
            root = _root(out)
            self._spike_tensors[id(root)] = weakref.ref(root)
        return hook

    def _is_spikes(self, x: torch.Tensor) -> bool:
        """True when x is (a view of) a LIF output of this forward: binary by construction."""
        root = _root(x)
        ref = self._spike_tensors.get(id(root))
        return ref is not None and ref() is root

    def _syn_hook(self, name: str):
        flag = f"nonbinary:{name}"

        def hook(module, args, out):
            x = args[0]
            lead = self._lead(x)
            self._add_dense(f"macs:{name}", out.numel() // (self.T * self._B) * _fan_in(module))
            if self._known_dense.get(name, False):
                return  # an earlier input was not binary: this layer does MACs; events are not needed
            if not self._is_spikes(x) and bool(torch.ne(x, 0).logical_and_(torch.ne(x, 1)).any()):
                self.counts[flag] += 1
                self._known_dense[name] = True
                return
            if isinstance(module, nn.Conv2d):
                H, W = x.shape[-2:]
                key = (name, H, W)
                if key not in self._fanout:
                    self._fanout[key] = _fanout_map(module, H, W).to(x.device).flatten()
                per_pixel = x.sum(dim=lead, dtype=torch.float32)  # spikes over input channels: exact
                events = (per_pixel.reshape(-1, H * W).double() @ self._fanout[key]) * \
                    (module.out_channels // module.groups)
            else:
                dims = tuple(range(lead, x.dim()))
                events = _exact_sum(x, dims, x.numel() // (self.T * self._B)) * module.out_features
            self._add(f"events:{name}", events.reshape(-1))
        return hook

    # ---- per batch -----------------------------------------------------------------------
    def begin_batch(self, batch_size: int) -> None:
        self._B, self._batch, self._dense, self._spike_tensors = batch_size, {}, {}, {}

    def end_batch(self, prefix: torch.Tensor, top1_hit: torch.Tensor) -> None:
        """prefix-mean logits [T, B, C] and top-1 hits [T, B] (bool) of the batch just run."""
        c = self.counts
        exit_idx = early_exit_steps(prefix, self._th)                         # [K, B]
        hit = top1_hit.to(self.device).long()
        c["exit_correct"] += hit.gather(0, exit_idx).sum(1)
        steps = (exit_idx + 1).long().sum(1)                                  # [K]
        c["exit_steps"] += steps
        for key, v in self._batch.items():
            c[key] += v.sum(1)
            kind, name = key.split(":", 1)
            if kind == "events":
                c[f"events_exit:{name}"] += v.cumsum(0).gather(0, exit_idx).sum(1)
        for key, per_step in self._dense.items():
            c[key] += per_step * self._B
            if key.startswith("macs:"):
                c["macs_exit:" + key.split(":", 1)[1]] += per_step * steps
        self._batch, self._dense, self._spike_tensors = {}, {}, {}


# ---- counts -> report ------------------------------------------------------------------------
def _layer_names(counts: dict, kind: str) -> list[str]:
    return [k.split(":", 1)[1] for k in counts if k.startswith(kind + ":")]


def deploy_report(counts: dict, thresholds: Sequence[float], total: int, T: int) -> dict:
    """All-reduced counts (DeployStats.counts keys) -> JSON-ready deployment fields per T' = 1..T.

    Rates are fractions (spikes per neuron per step), operations are per image, energy in uJ
    per image; the integer totals they come from are kept (``*_total``) for exact comparisons.
    """
    n = max(int(total), 1)
    K = len(thresholds)
    get = lambda key: torch.as_tensor(counts[key]).long().cpu()  # noqa: E731
    per_image = lambda v: (v.double() / n).tolist()  # noqa: E731

    rates = {}
    spikes, neurons = torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long)
    for name in _layer_names(counts, "spikes"):
        s, m = get(f"spikes:{name}").cumsum(0), get(f"neurons:{name}").cumsum(0)
        rates[name] = (s.double() / m.clamp(min=1).double()).tolist()
        spikes, neurons = spikes + s, neurons + m

    layers = {}
    ac, mac = torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long)
    ac_exit, mac_exit = torch.zeros(K, dtype=torch.long), torch.zeros(K, dtype=torch.long)
    for name in _layer_names(counts, "events"):
        binary = int(counts[f"nonbinary:{name}"]) == 0
        kind = "events" if binary else "macs"
        ops, ops_exit = get(f"{kind}:{name}").cumsum(0), get(f"{kind}_exit:{name}")
        layers[name] = {"kind": "AC" if binary else "MAC", "ops_per_image": per_image(ops)}
        if binary:
            ac, ac_exit = ac + ops, ac_exit + ops_exit
        else:
            mac, mac_exit = mac + ops, mac_exit + ops_exit

    def energy_uj(a: torch.Tensor, m: torch.Tensor) -> list[float]:
        return ((E_AC_PJ * a.double() + E_MAC_PJ * m.double()) / n * 1e-6).tolist()

    correct, steps = get("exit_correct").tolist(), get("exit_steps").tolist()
    return {
        "firing_rate": {"overall": (spikes.double() / neurons.clamp(min=1).double()).tolist(), "layers": rates},
        "spikes_total": spikes.tolist(),
        "sops_per_image": per_image(ac),
        "macs_per_image": per_image(mac),
        "energy_uJ_per_image": energy_uj(ac, mac),
        "sops_total": ac.tolist(),
        "macs_total": mac.tolist(),
        "layers": layers,
        "energy_model": dict(ENERGY_MODEL),
        "early_exit": {
            "thresholds": [float(t) for t in thresholds],
            "top1": [100.0 * c / n for c in correct],
            "top1_correct": correct,
            "mean_steps": [s / n for s in steps],
            "steps_total": steps,
            "sops_per_image": per_image(ac_exit),
            "macs_per_image": per_image(mac_exit),
            "energy_uJ_per_image": energy_uj(ac_exit, mac_exit),
            "sops_total": ac_exit.tolist(),
            "rule": "per sample: stop at the first t whose max softmax of the prefix-mean logits >= "
                    "threshold, else at T_max; operations counted per sample up to its exit step",
        },
    }
