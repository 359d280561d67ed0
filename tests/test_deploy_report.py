"""Deployment report: firing rates, synaptic operations, energy and early exit per T', and export.

The hand-counted network: a 4x4 grey image -> 1x1 conv (weight 1, analog input: MACs) -> LIF1
-> 3x3 conv stride 2 padding 1 (1 -> 2 channels, binary input: ACs) -> LIF2 -> Linear(8, 3)
(binary input: ACs). LIF: decay 0.5, threshold 1, hard reset, so under a constant input
    1.0   spikes at every step,   0.75 at even steps,   0.625 at steps 3, 6,   0 never.
"""
import json

import pytest
import torch
from torch import nn

from conftest import run_launcher
from fullrange.cli import sweep_main
from fullrange.deploy_stats import E_AC_PJ, E_MAC_PJ, DeployStats, deploy_report, early_exit_steps
from fullrange.models import build_model
from fullrange.models.layers import MergedLIF, encode_direct
from fullrange.evaluate import prefix_counts, prefix_mean
from fullrange.sweep import load_run
from test_sweep import NEURON, _fake_run, _trained_looking

LIF_ARGS = {"decay": 0.5, "threshold": 1.0, "reset": "hard", "surrogate_alpha": 4.0, "detach_reset": False}
IMAGE = [[1.0, 0.0, 0.75, 0.0],
         [0.0, 0.0, 0.0, 0.0],
         [0.0, 0.625, 0.0, 0.0],
         [0.0, 0.0, 0.0, 1.0]]


class HandNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 1, bias=False)
        self.lif1 = MergedLIF(**LIF_ARGS)
        self.conv2 = nn.Conv2d(1, 2, 3, stride=2, padding=1, bias=False)
        self.lif2 = MergedLIF(**LIF_ARGS)
        self.fc = nn.Linear(8, 3, bias=False)
        with torch.no_grad():
            self.conv1.weight.fill_(1.0)
            self.conv2.weight.zero_()
            self.conv2.weight[0].fill_(1.0)  # channel 0 counts the spikes in its window, channel 1 is silent
            self.fc.weight.copy_(torch.arange(24.0).view(3, 8) / 24)

    def forward(self, x, T):
        x, T = encode_direct(x, T)
        s = self.lif2(self.conv2(self.lif1(self.conv1(x), T)), T)
        return self.fc(s.flatten(1)).view(T, -1, 3)


# Counted on paper, per step t = 1..6, for IMAGE (the second image of the batch is all zeros).
# LIF1 spikes: t1 (0,0),(3,3); t2 + (0,2); t3 (0,0),(3,3),(2,1); t4 as t2; t5 as t1; t6 all four.
LIF1_SPIKES = [2, 3, 3, 3, 2, 4]
# conv2 fan-out of an input pixel (stride 2, padding 1, 4x4 -> 2x2): rows/cols 0,1,2,3 reach 1,2,1,1
# output rows/cols, so (0,0) 1, (0,2) 1, (2,1) 2, (3,3) 1 output positions, times 2 output channels.
CONV2_EVENTS = [2 * 2, 3 * 2, 4 * 2, 3 * 2, 2 * 2, 5 * 2]
# LIF2 spikes where a window holds a spike (channel 0): (0,0)->out(0,0), (3,3)->(1,1), (0,2)->(0,1),
# (2,1)->(1,0),(1,1).
LIF2_SPIKES = [2, 3, 3, 3, 2, 4]
FC_EVENTS = [3 * s for s in LIF2_SPIKES]  # each spike reaches 3 outputs
CONV1_MACS = 16  # 16 outputs x fan-in 1 per image per step (analog input)


def _cum(values):
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def test_hand_counted_rates_sops_and_energy_per_T():
    model = HandNet().eval()
    x = torch.stack([torch.tensor(IMAGE).unsqueeze(0), torch.zeros(1, 4, 4)])  # B = 2
    y = torch.tensor([0, 1])
    T = 6
    stats = DeployStats(model, T)
    counts = prefix_counts(model, [(x, y)], T, spiking=True, stats=stats)
    r = deploy_report(counts, stats.thresholds, int(counts["total"]), T)

    assert r["layers"]["conv1"]["kind"] == "MAC"
    assert r["layers"]["conv2"]["kind"] == "AC" and r["layers"]["fc"]["kind"] == "AC"
    n = 2
    for t in range(1, T + 1):
        lif1, lif2 = _cum(LIF1_SPIKES)[t - 1], _cum(LIF2_SPIKES)[t - 1]
        assert r["firing_rate"]["layers"]["lif1"][t - 1] == pytest.approx(lif1 / (16 * n * t))
        assert r["firing_rate"]["layers"]["lif2"][t - 1] == pytest.approx(lif2 / (8 * n * t))
        assert r["firing_rate"]["overall"][t - 1] == pytest.approx((lif1 + lif2) / (24 * n * t))
        conv2, fc = _cum(CONV2_EVENTS)[t - 1], _cum(FC_EVENTS)[t - 1]
        assert r["layers"]["conv2"]["ops_per_image"][t - 1] == pytest.approx(conv2 / n)
        assert r["layers"]["fc"]["ops_per_image"][t - 1] == pytest.approx(fc / n)
        assert r["sops_total"][t - 1] == conv2 + fc
        assert r["macs_total"][t - 1] == CONV1_MACS * n * t
        energy_pj = (E_AC_PJ * (conv2 + fc) + E_MAC_PJ * CONV1_MACS * n * t) / n
        assert r["energy_uJ_per_image"][t - 1] == pytest.approx(energy_pj * 1e-6)
    assert r["sops_total"] == [10, 25, 42, 57, 67, 89]  # the same, summed by hand
    assert r["energy_uJ_per_image"][0] == pytest.approx((0.9 * 10 + 4.6 * 32) / 2 * 1e-6)
    assert r["energy_model"]["E_AC_pJ"] == 0.9 and r["energy_model"]["E_MAC_pJ"] == 4.6
    assert "Horowitz" in r["energy_model"]["source"] and "ISSCC 2014" in r["energy_model"]["source"]


def test_hooks_are_removed_after_the_sweep():
    model = HandNet().eval()
    stats = DeployStats(model, 2)
    prefix_counts(model, [(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))], 2, spiking=True, stats=stats)
    assert all(not m._forward_hooks for m in model.modules())


def _random_student():
    torch.manual_seed(3)
    model = build_model("spiking_resnet_tiny", 10, 1, {**NEURON, "decay": 0.9, "threshold": 0.5})
    return _trained_looking(model, torch.randn(16, 1, 28, 28) * 2, 3)


def test_early_exit_extremes_and_brute_force():
    model = _random_student()
    torch.manual_seed(4)
    batches = [(torch.randn(9, 1, 28, 28) * 2, torch.randint(0, 10, (9,))) for _ in range(2)]
    T = 5
    with torch.no_grad():  # middle thresholds at quantiles of the confidences, so samples exit at various t
        conf = torch.cat([prefix_mean(model(x, T)).softmax(-1).amax(-1).flatten() for x, _ in batches])
    thresholds = (0.0, *conf.quantile(torch.tensor([0.3, 0.6, 0.9])).tolist(), 1.01)
    stats = DeployStats(model, T, thresholds)
    counts = prefix_counts(model, batches, T, spiking=True, stats=stats)
    r = deploy_report(counts, thresholds, int(counts["total"]), T)
    e, n = r["early_exit"], 18
    assert e["steps_total"][0] == n and e["mean_steps"][0] == 1.0           # threshold 0: one step
    assert e["top1_correct"][0] == int(counts["top1"][0])
    assert e["steps_total"][-1] == n * T and e["mean_steps"][-1] == T       # > 1: never early
    assert e["top1_correct"][-1] == int(counts["top1"][T - 1])
    assert e["sops_total"][0] == r["sops_total"][0] and e["sops_total"][-1] == r["sops_total"][-1]
    # brute force, sample by sample, with separate shorter forwards
    with torch.no_grad():
        for k, th in enumerate(thresholds):
            correct = steps = 0
            for x, y in batches:
                for b in range(x.shape[0]):
                    for t in range(1, T + 1):
                        z = model(x[b:b + 1], t).mean(0)[0]
                        if z.softmax(-1).max() >= th or t == T:
                            break
                    correct += int(z.argmax() == y[b])
                    steps += t
            assert (e["top1_correct"][k], e["steps_total"][k]) == (correct, steps), th
    assert len(set(e["steps_total"])) > 2  # the middle thresholds really exit at different steps


def test_early_exit_steps_by_hand():
    # B=2, C=2: sample 0 is confident (softmax 0.88) at t=1, sample 1 only from t=3 on.
    prefix = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [0.5, 0.0]], [[2.0, 0.0], [3.0, 0.0]]])
    steps = early_exit_steps(prefix, torch.tensor([0.0, 0.6, 0.9, 1.01])) + 1
    assert steps.tolist() == [[1, 1], [1, 2], [3, 3], [3, 3]]


def test_export_loads_with_new_T_and_sweeps(tmp_path, tiny_data):
    run = _fake_run(tmp_path, tiny_data)
    (run / "sweep.json").write_text(json.dumps({"fake": {"T_train": 3, "total": 101, "top1": [10.0, 20.0],
                                                         "top5": [50.0, 60.0]}}))
    assert sweep_main([str(run), "--export", "2"]) == 0
    out = run / "export_T2"
    cfg, model = load_run(out)
    assert cfg.model.T == 2 and cfg.name == "export_T2"
    _, original = load_run(run)
    for (k, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), k
    deploy = json.loads((out / "deploy.json").read_text())
    assert deploy["T"] == 2 and deploy["top1"] == 20.0
    assert sweep_main([str(run), "--export", "0"]) == 2
    swept = run_launcher("sweep.py", [str(out), "--t-max", "2"], nproc=1)
    assert swept.returncode == 0, swept.stderr[-3000:]
    result = json.loads((out / "sweep.json").read_text())["export_T2"]
    assert result["T_train"] == 2 and result["total"] == 101 and len(result["top1"]) == 2
    assert "early exit" in swept.stdout and "Horowitz" in swept.stdout
