"""Config: YAML + base chains, dotted overrides, strict types and keys, resolved dump."""
from pathlib import Path

import pytest
import yaml

from fullrange.config import ConfigError, RunConfig, from_dict, load_config, parse_override, save_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_load():
    names = {p.stem: load_config(p).name for p in CONFIGS.glob("*.yaml")}
    assert names["fmnist"] == "fmnist_fullrange" and len(names) == 8
    assert all(n == stem for stem, n in names.items() if stem != "fmnist"), names


def test_paper_recipes():
    for name in ("cifar100_r19", "cifar10_r18"):
        c = load_config(CONFIGS / f"{name}.yaml")
        assert (c.model.T, c.neuron.decay, c.neuron.reset, c.loss.tau, c.optim.lr, c.data.batch_size) == \
            (6, 0.5, "hard", 3.0, 0.1, 128)
        assert (c.data.autoaugment, c.data.cutout, c.optim.schedule, c.optim.epochs, c.loss.sd_target) == \
            (True, 16, "epoch", 300, "correct_only")
    for name in ("cifar10_teacher", "cifar100_teacher"):
        t = load_config(CONFIGS / f"{name}.yaml")
        assert (t.model.name, t.loss.kind, t.data.autoaugment, t.data.cutout, t.optim.schedule) == \
            ("resnet34_cifar", "ce", True, 16, "epoch")
    i = load_config(CONFIGS / "imagenet_r34.yaml")
    assert (i.model.T, i.neuron.decay, i.neuron.reset, i.loss.tau, i.optim.lr, i.data.batch_size, i.optim.weight_decay) == \
        (4, 0.2, "soft", 1.0, 0.2, 512, 2e-5)
    assert (i.model.sync_bn, i.optim.schedule, i.loss.sd_target, i.data.autoaugment) == (True, "epoch", "correct_only", False)


def test_base_chain_and_overrides():
    cfg = load_config(CONFIGS / "fmnist_skd.yaml", ["optim.lr=0.05", "optim.weight_decay=1e-3", "model.T=6",
                                                    "neuron.detach_reset=true", "name=x"])
    assert cfg.loss.kind == "skd" and cfg.model.name == "spiking_resnet_tiny"  # from the base file
    assert cfg.optim.lr == 0.05 and cfg.optim.weight_decay == 1e-3 and cfg.model.T == 6
    assert cfg.neuron.detach_reset is True and cfg.name == "x"


def test_parse_override():
    assert parse_override("optim.lr=0.05") == {"optim": {"lr": 0.05}}
    assert parse_override("name=abc") == {"name": "abc"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
    ("nosuch=1", "unknown config key 'nosuch'"),
    ("optim.lr=abc", "config key optim.lr: expected float, got 'abc'"),
    ("model.T=2.5", "config key model.T: expected int"),
    ("neuron.detach_reset=3", "config key neuron.detach_reset: expected bool"),
    ("neuron.reset=medium", "config key neuron.reset: expected one of"),
    ("model.T=0", "config key model.T: expected > 0"),
    ("model.name=resnet9000", "config key model.name: unknown model"),
    ("neuron.decay=1.5", "config key neuron.decay"),
    ("teacher.cache_dir=", "teacher.name and teacher.cache_dir"),
    ("teacher.source=live teacher.checkpoint=", "teacher.name and teacher.checkpoint"),
    ("optim=3", "config key optim: expected a mapping"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(CONFIGS / "fmnist.yaml", override.split())


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(loop)


def test_teacher_loss_must_be_ce():
    with pytest.raises(ConfigError, match="loss.kind"):
        load_config(CONFIGS / "fmnist_teacher.yaml", ["loss.kind=full_range"])


def test_resolved_dump_roundtrip(tmp_path):
    cfg = load_config(CONFIGS / "fmnist.yaml", ["optim.lr=0.07"])
    save_config(cfg, tmp_path / "config.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)
    assert isinstance(again, RunConfig) and again.optim.lr == 0.07
    assert not list(tmp_path.glob(".*tmp"))
