"""Typed run configuration: YAML files, dotted command-line overrides, strict validation.

A config file is YAML whose top-level keys are the sections of :class:`RunConfig`. A file may
name ``base: other.yaml`` (relative to itself) to start from another file. Overrides are
``section.key=value`` strings (``optim.lr=0.05``); values are parsed as YAML and then checked
against the field's type. Unknown keys, wrong types and values outside a field's choices raise
:class:`ConfigError` with the dotted key and what was expected, before any work starts.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fullrange.atomic import write_text_atomic
from fullrange.losses import LOSS_KINDS, NEEDS_TEACHER, SD_TARGETS
from fullrange.models.memory import MEMORY_MODES
from fullrange.neuron import BACKENDS, RESETS
from fullrange.optim import SCHEDULES
from fullrange.targets import SOURCES


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it and what was expected."""


def rule(default, *, choices: tuple | None = None, gt: float | None = None, ge: float | None = None,
         le: float | None = None):
    """A config field with its rule: one of `choices` (for a list: each item), or a number > gt /
    >= ge / <= le."""
    kwargs = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**kwargs, metadata={"choices": choices, "gt": gt, "ge": ge, "le": le})


TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")


@dataclass
class ModelConfig:
    name: str = "spiking_resnet_tiny"                # a registered model (fullrange.models.MODEL_NAMES)
    T: int = rule(4, gt=0)                           # training timesteps (students); ignored for ANN teachers
    num_classes: int = rule(10, gt=0)
    in_channels: int = rule(1, gt=0)
    sync_bn: bool = False                            # SyncBatchNorm across processes (multi-process CUDA; plain BatchNorm on CPU)
    memory: str = rule("default", choices=MEMORY_MODES)  # students: what the backward keeps (fullrange.models.memory)
    recompute_blocks: int = rule(0, ge=0)            # spikes_1bit: the first N residual blocks recomputed as in checkpoint
    fuse_bn_lif: bool = True                         # BN (+ residual) + LIF as one op: Triton on CUDA (layers.bn_lif), numba on CPU (models.unit_cpu)
    stem_once: bool = True                           # students: stem once per image, not T times (layers.stem_runs_once)
    compile: bool = False                            # torch.compile of the forward (nn.Module.compile: same keys)


@dataclass
class NeuronConfig:
    decay: float = rule(0.5, ge=0, le=1)             # lambda: membrane decay
    threshold: float = rule(1.0, gt=0)
    reset: str = rule("hard", choices=RESETS)
    surrogate_alpha: float = rule(4.0, gt=0)         # slope of the sigmoid surrogate
    detach_reset: bool = False
    backend: str = rule("auto", choices=BACKENDS)    # auto: Triton on CUDA, fused CPU kernel for fp32/fp64 on CPU


@dataclass
class DataConfig:
    train_path: str = "data/fmnist/train.beton"
    val_path: str = "data/fmnist/val.beton"
    batch_size: int = rule(128, gt=0)                # global batch: split evenly across processes
    val_batch_size: int = rule(500, gt=0)            # per process
    num_workers: int = rule(2, ge=0)
    os_cache: bool = True                            # True: OS page cache (multi-GPU); False: FFCV process cache
    pad: int = rule(4, ge=0)                         # padded random crop (pixels) for raw small images; 0 disables
    flip: bool = True                                # random horizontal flip
    channels_last: bool = False
    image_size: int = rule(224, gt=0)                # RandomResizedCrop output (JPEG .beton files, e.g. ImageNet)
    rrc_scale_min: float = rule(0.08, gt=0, le=1)    # RandomResizedCrop area range (rrc_scale_min, 1)
    val_image_size: int = rule(0, ge=0)              # centre-crop output for validation; 0: same as image_size
    val_crop_ratio: float = rule(0.875, gt=0, le=1)  # centre crop / resized short side (224 of 256)
    batches_ahead: int = rule(3, gt=0)               # batches FFCV prepares ahead
    views: int = rule(0, ge=0)                       # random views per sample: 0 a new one every epoch; K cycles K
    autoaugment: bool = False                        # replayable AutoAugment (CIFAR10Policy) on the device batch
    cutout: int = rule(0, ge=0)                      # side of one replayable Cutout hole (pixels); 0 disables


@dataclass
class OptimConfig:
    lr: float = rule(0.1, gt=0)                      # for the global batch
    momentum: float = rule(0.9, ge=0)
    nesterov: bool = False
    weight_decay: float = rule(5e-4, ge=0)           # not applied to BatchNorm parameters or biases
    epochs: int = rule(10, gt=0)
    warmup_epochs: float = rule(0.0, ge=0)           # linear warmup, then cosine to 0 (per step)
    grad_clip: float = rule(0.0, ge=0)               # max global grad norm; 0 disables
    schedule: str = rule("step", choices=SCHEDULES)  # cosine evaluated per step, or per epoch (the official code)


@dataclass
class LossConfig:
    kind: str = rule("full_range", choices=LOSS_KINDS)   # ANN teachers: ce
    alpha: float = rule(0.2, ge=0)                   # weight of the teacher KD term
    beta: float = rule(0.5, ge=0)                    # weight of the self-distillation term
    tau: float = rule(1.0, gt=0)                     # temperature
    sd_target: str = rule("ensemble", choices=SD_TARGETS)  # ensemble (paper) | correct_only (official code)


@dataclass
class TeacherConfig:
    name: str = ""                                   # registered ANN model name; "" for runs without a teacher
    checkpoint: str = ""                             # a state_dict file (torchvision key names), e.g. runs/x/model.pt
    source: str = rule("live", choices=SOURCES)      # live: runs in every step; cache: read cache_dir, no teacher
    cache_dir: str = ""                              # teacher-logit cache (launcher/cache_teacher.py writes it)
    topk: int = rule(16, gt=0)                       # logits kept per (view, sample); >= classes: exact


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = rule(0, ge=0)
    resume: bool = False
    log_every: int = rule(50, ge=0)                  # steps between metrics.jsonl lines
    max_steps_per_epoch: int = rule(0, ge=0)         # 0: whole epochs; >0 truncates (smoke tests)
    checkpoint_every_steps: int = rule(0, ge=0)      # >0: also checkpoint inside epochs (exact mid-epoch resume)
    stop_check_every: int = rule(10, gt=0)           # steps between the ranks' stop agreement (a host sync)
    dist_timeout_s: int = rule(1800, gt=0)           # a collective waiting longer (a dead or hung rank) fails the run
    log_with: list = rule([], choices=TRACKERS)      # experiment trackers (accelerate's), beside metrics.jsonl
    model: ModelConfig = field(default_factory=ModelConfig)
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Check ``value`` against a scalar field type, converting only what is unambiguous."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-3" as a string
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list:  # of strings; a single string is a one-item list
        if isinstance(value, str):
            return [value] if value else []
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    raise ConfigError(f"config key {key}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    """Set ``values`` (a nested dict) onto the dataclass ``obj``, strictly."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}; known keys here: {', '.join(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(dotted, value, type(current)))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file, merging its ``base:`` chain (the file's own keys win)."""
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found (expected a YAML file)")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / base, seen + (path.resolve(),))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def parse_override(text: str) -> dict:
    """``'optim.lr=0.05'`` -> ``{'optim': {'lr': 0.05}}``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=0.05")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    node = nested
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return nested


def _check_rules(obj: Any, prefix: str = "") -> None:
    """Every field's own rule (rule(): choices and bounds); ConfigError naming the key."""
    for f in dataclasses.fields(obj):
        value, key, m = getattr(obj, f.name), f"{prefix}{f.name}", f.metadata
        if dataclasses.is_dataclass(value):
            _check_rules(value, key + ".")
        elif m.get("choices") is not None and isinstance(value, list):
            if any(v not in m["choices"] for v in value):
                raise ConfigError(f"config key {key}: expected a list of {tuple(m['choices'])}, got {value!r}")
        elif m.get("choices") is not None and value not in m["choices"]:
            raise ConfigError(f"config key {key}: expected one of {tuple(m['choices'])}, got {value!r}")
        elif m.get("gt") is not None and m.get("le") is not None and not m["gt"] < value <= m["le"]:
            raise ConfigError(f"config key {key}: expected a value in ({m['gt']}, {m['le']}], got {value!r}")
        elif m.get("ge") is not None and m.get("le") is not None and not m["ge"] <= value <= m["le"]:
            raise ConfigError(f"config key {key}: expected a value in [{m['ge']}, {m['le']}], got {value!r}")
        elif m.get("gt") is not None and not value > m["gt"]:
            raise ConfigError(f"config key {key}: expected > {m['gt']}, got {value!r}")
        elif m.get("ge") is not None and not value >= m["ge"]:
            raise ConfigError(f"config key {key}: expected >= {m['ge']}, got {value!r}")


def validate(cfg: RunConfig) -> None:
    """Each field's rule, then the cross-field checks; raises ConfigError naming the key."""
    _check_rules(cfg)
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"config key name: expected a non-empty name without '/', got {cfg.name!r}")
    from fullrange.models import MODEL_NAMES, is_spiking

    for key in ("model.name", "teacher.name"):
        name = get_key(cfg, key)
        if (name or key == "model.name") and name not in MODEL_NAMES:
            raise ConfigError(f"config key {key}: unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    if not is_spiking(cfg.model.name) and cfg.model.memory != "default":
        raise ConfigError(f"config key model.memory: memory modes are for spiking students; an ANN model "
                          f"({cfg.model.name}) takes 'default', got {cfg.model.memory!r}")
    if cfg.model.recompute_blocks:
        _check_recompute_blocks(cfg.model)
    if not is_spiking(cfg.model.name) and cfg.loss.kind != "ce":
        raise ConfigError(f"config key loss.kind: an ANN model ({cfg.model.name}) trains with 'ce', "
                          f"got {cfg.loss.kind!r}")
    if NEEDS_TEACHER[cfg.loss.kind]:
        if cfg.teacher.source == "cache":
            if not cfg.teacher.name or not cfg.teacher.cache_dir:
                raise ConfigError(f"config keys teacher.name and teacher.cache_dir: loss {cfg.loss.kind!r} with "
                                  "teacher.source=cache needs the teacher's model name and a cache directory")
        elif not cfg.teacher.name or not cfg.teacher.checkpoint:
            raise ConfigError(f"config keys teacher.name and teacher.checkpoint: loss {cfg.loss.kind!r} "
                              "needs a teacher (a model name and a weights file)")
        if is_spiking(cfg.teacher.name):
            raise ConfigError(f"config key teacher.name: expected an ANN model, got spiking {cfg.teacher.name!r}")


def _check_recompute_blocks(model: ModelConfig) -> None:
    """model.recompute_blocks: a spikes_1bit student with at least that many residual blocks
    (counted on a weightless build of the model, on the meta device)."""
    if model.memory != "spikes_1bit":
        raise ConfigError(f"config key model.recompute_blocks: recomputes blocks of a model.memory=spikes_1bit "
                          f"student, got model.memory={model.memory!r} (checkpoint recomputes every block)")
    import torch

    from fullrange.models import build_model
    from fullrange.models.memory import residual_blocks

    with torch.device("meta"):
        n = len(residual_blocks(build_model(model.name, model.num_classes, model.in_channels)))
    if model.recompute_blocks > n:
        raise ConfigError(f"config key model.recompute_blocks: {model.name} has {n} residual blocks, "
                          f"got {model.recompute_blocks}")


def get_key(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Build a validated RunConfig from a YAML file (or defaults when None) and overrides."""
    cfg = RunConfig()
    if path is not None:
        _apply(cfg, _read_yaml(Path(path)))
    for text in overrides:
        _apply(cfg, parse_override(text))
    validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig from :func:`to_dict` output (e.g. a run directory's config.yaml)."""
    cfg = RunConfig()
    _apply(cfg, values)
    validate(cfg)
    return cfg


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file + rename)."""
    write_text_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
