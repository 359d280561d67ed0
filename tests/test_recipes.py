"""The paper recipes (CIFAR-100 ResNet-19, ImageNet pre-activation ResNet-34) build and train a step."""
from pathlib import Path

import pytest
import torch

from fullrange.config import load_config
from fullrange.evaluate import logits_over_time
from fullrange.losses import student_loss
from fullrange.models import build_model
from fullrange.optim import build_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name, size", [("cifar100_r19", 32), ("imagenet_r34", 64)])
def test_recipe_trains_one_step(name, size):
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / f"{name}.yaml")
    model = build_model(cfg.model.name, cfg.model.num_classes, cfg.model.in_channels, vars(cfg.neuron))
    teacher = build_model(cfg.teacher.name, cfg.model.num_classes, cfg.model.in_channels).eval()
    lif = next(m for m in model.modules() if hasattr(m, "surrogate_alpha"))
    assert (lif.decay, lif.reset) == (cfg.neuron.decay, cfg.neuron.reset)
    x = torch.randn(2, cfg.model.in_channels, size, size)
    y = torch.randint(0, cfg.model.num_classes, (2,))
    optimizer = build_optimizer(model, cfg.optim)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        z_a = teacher(x)
    c = cfg.loss
    z = logits_over_time(model, x, cfg.model.T, True)
    loss, parts = student_loss(c.kind, z, y, z_a, c.alpha, c.beta, c.tau, c.sd_target)
    assert set(parts) == {"twce", "twkl", "twsd"} and torch.isfinite(loss)
    # the untrained student starts near chance: TWCE close to log(num_classes)
    assert abs(parts["twce"].item() - torch.log(torch.tensor(float(cfg.model.num_classes))).item()) < 2.0
    loss.backward()
    optimizer.step()
    moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert moved == len(before)
    groups = optimizer.param_groups
    assert groups[0]["weight_decay"] == cfg.optim.weight_decay and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim <= 1 for p in groups[1]["params"])


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_epoch_schedule_is_the_official_cosine():
    """optim.schedule=epoch: torch's CosineAnnealingLR(T_max=epochs) stepped after every epoch."""
    from fullrange.config import OptimConfig
    from fullrange.optim import build_scheduler

    cfg, steps = OptimConfig(lr=0.1, epochs=5, schedule="epoch"), 7
    model = torch.nn.Linear(2, 2)
    ours = build_optimizer(model, cfg)
    sched = build_scheduler(ours, cfg, steps)
    ref_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=5, eta_min=0)
    for epoch in range(5):
        for _ in range(steps):
            assert sched.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
            sched.step()
        ref.step()
    per_step = build_scheduler(build_optimizer(model, OptimConfig(lr=0.1, epochs=5)), OptimConfig(epochs=5), steps)
    per_step.step()
    assert per_step.get_last_lr()[0] < 0.1  # the default moves every step
