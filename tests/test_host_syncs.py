"""No host sync in a training step except on log steps and the ranks' stop agreement.

Trains in this process (CPU, one process) with Tensor.item / tolist / cpu / __bool__ patched to
count their calls (on a GPU each would wait for the device), and reads the count at every step
hook: between the hooks of steps k and k + 1 run the bookkeeping of step k (its stop check and
log line) and the whole of step k + 1."""
import pytest
import torch

from conftest import REPO, student_overrides
from fullrange.config import load_config
from fullrange.engine import train
from fullrange.runtime import make_accelerator

SYNCS = ("item", "tolist", "cpu", "__bool__")


@pytest.fixture
def counted(monkeypatch):
    calls = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


@pytest.mark.parametrize("source", ["cache", "live"])
def test_steps_between_checks_do_not_sync(tmp_path, tiny_data, teacher_file, counted, source, monkeypatch):
    every = 4
    overrides = student_overrides(tiny_data, teacher_file, tmp_path, name=f"syncs_{source}", log_every=every,
                                  stop_check_every=every, **{"data.channels_last": "false"})
    cfg = load_config(REPO / "configs" / "fmnist.yaml", overrides)
    if source == "cache":
        from fullrange.teacher_cache import build_teacher_cache

        cfg.teacher.source, cfg.teacher.cache_dir = "cache", str(tmp_path / "cache")
        build_teacher_cache(cfg, make_accelerator())
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    marks = {}
    train(cfg, make_accelerator(), hooks=[lambda step, model: marks.setdefault(step, len(counted))])
    assert sorted(marks) == list(range(1, 9))  # 256 samples / batch 32: 8 steps
    between = {k: marks[k + 1] - marks[k] for k in range(1, 8)}
    assert all(between[k] == 0 for k in between if k % every), (between, counted)
    assert between[every] > 0  # the probe sees the log step and the stop check
