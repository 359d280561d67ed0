"""Full-range sweep: prefix means equal separate evaluations; counts are exact in any world size."""
import json

import pytest
import torch

from conftest import run_launcher
from fullrange.config import load_config, save_config
from fullrange.models import build_model
from fullrange.evaluate import prefix_counts, prefix_mean, topk_correct

NEURON = {"decay": 0.5, "threshold": 1.0, "reset": "hard", "surrogate_alpha": 4.0, "detach_reset": False}


def test_prefix_mean_by_hand():
    z = torch.tensor([[[1.0, 4.0]], [[3.0, 0.0]], [[5.0, 2.0]]])  # T=3, B=1, C=2
    expected = torch.tensor([[[1.0, 4.0]], [[2.0, 2.0]], [[3.0, 2.0]]])
    assert torch.equal(prefix_mean(z), expected)


def test_topk_correct_by_hand():
    prefix = torch.tensor([[[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]]])  # T=1, B=2, C=3
    got = topk_correct(prefix, torch.tensor([2, 0]), ks=(1, 2))
    assert got[1].tolist() == [1] and got[2].tolist() == [2]


def _trained_looking(model, x, T):
    """Give BatchNorm non-trivial running statistics, then switch to eval."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x, T)
    return model.eval()


@pytest.mark.parametrize("name, in_ch, size", [("spiking_resnet_tiny", 1, 28), ("spiking_resnet18_cifar", 3, 32)])
def test_prefix_equals_separate_forward(name, in_ch, size):
    torch.manual_seed(0)
    model = build_model(name, 10, in_ch, {**NEURON, "decay": 0.9, "threshold": 0.5})
    x = torch.randn(6, in_ch, size, size) * 2
    model = _trained_looking(model, x, 4)
    with torch.no_grad():
        prefix = prefix_mean(model(x, 6))
        for t in range(1, 7):
            alone = model(x, t).float().mean(0)
            assert torch.allclose(prefix[t - 1], alone, atol=1e-5), t


def test_prefix_counts_match_per_T_evaluation():
    torch.manual_seed(1)
    model = _trained_looking(build_model("spiking_resnet_tiny", 10, 1, NEURON), torch.randn(16, 1, 28, 28), 3)
    batches = [(torch.randn(7, 1, 28, 28), torch.randint(0, 10, (7,))) for _ in range(3)]
    counts = prefix_counts(model, batches, 5, spiking=True)
    assert int(counts["total"]) == 21
    with torch.no_grad():
        for t in range(1, 6):
            correct = sum(int((model(x, t).mean(0).argmax(-1) == y).sum()) for x, y in batches)
            assert int(counts["top1"][t - 1]) == correct


def _fake_run(tmp_path, tiny_data):
    """A run directory with a random spiking student whose BN statistics are non-trivial."""
    cfg = load_config(None, [f"data.train_path={tiny_data['train']}", f"data.val_path={tiny_data['val']}",
                             "loss.kind=tet", "model.T=3", "name=fake", f"out_dir={tmp_path}",
                             "data.val_batch_size=16", "data.num_workers=1"])
    torch.manual_seed(2)
    model = build_model(cfg.model.name, 10, 1, vars(cfg.neuron))
    model = _trained_looking(model, torch.rand(32, 1, 28, 28) * 3, 3)
    run = cfg.run_dir
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    torch.save(model.state_dict(), run / "model.pt")
    return run


def test_two_process_sweep_counts_equal_one_process(tmp_path, tiny_data):
    run = _fake_run(tmp_path, tiny_data)
    one = run_launcher("sweep.py", [str(run)], nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    single = json.loads((run / "sweep.json").read_text())["fake"]
    two = run_launcher("sweep.py", [str(run)], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    double = json.loads((run / "sweep.json").read_text())["fake"]
    assert single["total"] == double["total"] == 101
    assert len(single["top1_correct"]) == 6  # default T_max = 2 x training T
    assert single["top1_correct"] == double["top1_correct"]
    assert single["top5_correct"] == double["top5_correct"]
    # deployment statistics from the same pass: exact integer sums over ranks
    assert single["spikes_total"] == double["spikes_total"] and sum(single["spikes_total"]) > 0
    assert single["sops_total"] == double["sops_total"] and single["sops_total"][0] > 0
    assert single["macs_total"] == double["macs_total"] and single["macs_total"][0] > 0
    assert single["early_exit"]["top1_correct"] == double["early_exit"]["top1_correct"]
    assert single["early_exit"]["steps_total"] == double["early_exit"]["steps_total"]
    assert single["early_exit"]["sops_total"] == double["early_exit"]["sops_total"]
    assert single["early_exit"]["steps_total"][0] == 101 and single["early_exit"]["steps_total"][-1] == 6 * 101
    assert single["early_exit"]["top1_correct"][-1] == single["top1_correct"][-1]
    assert single == double  # every derived number too (rates, per-layer ops, energy)
    assert (run / "sweep.png").stat().st_size > 1000
    assert (run / "sweep.txt").is_file()
    assert "T'" in one.stdout and "early exit" in one.stdout and "SOPs" in one.stdout
