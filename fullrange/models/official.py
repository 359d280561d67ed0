"""Load checkpoints of the official code into fullrange students.

The official code (Intelli-Chip-Lab/snn_temporal_decoupling_distillation) saves
``{"best_acc", "best_epoch", "best_net": model.module.state_dict(), "optimizer"}``.
:func:`convert_official` takes that dict (or a bare state_dict, with or without DDP's
``module.`` prefix) and returns a state_dict for a fullrange model; the forward passes then
agree (the CIFAR students bit for bit). Key names, official -> fullrange:

CIFAR students (official ``resnet18`` / ``resnet19``; LIF layers hold no tensors):
    conv0.0, conv0.1                        -> conv1, bn1            (conv0.2 is the stem LIF)
    layerK.J.shortcut.0, .1                 -> layerK.J.downsample.0, .1
    classifier.0  (resnet18)                -> fc
    classifier.0, classifier.2  (resnet19)  -> head_fc, fc           (classifier.1 is a LIF)
    layerK.J.conv1, bn1, conv2, bn2         unchanged
ImageNet student (official ``preact_resnet34``, torchvision names):
    conv1 (with bias), bn1, layerK.J.conv1, bn1, conv2, bn2, downsample.0, .1, fc   unchanged;
    also accepted: layerK.J.conv1.0 / .1 and conv2.0 / .1 (conv, BN in one container).
    Its block convs carry biases that feed a BatchNorm. They are folded into that BN:
    BN(conv(x) + b) uses (conv(x) + b - running_mean) in eval mode, which equals
    conv(x) - (running_mean - b), so running_mean <- running_mean - b; in training mode the
    batch mean absorbs b exactly, and the running mean keeps tracking running_mean - b.

Any key left over, or missing, is named in the ValueError.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

CIFAR_RENAMES = ((r"^conv0\.0\.", "conv1."), (r"^conv0\.1\.", "bn1."), (r"\.shortcut\.", ".downsample."))
HEADS = {"spiking_resnet18_cifar": ((r"^classifier\.0\.", "fc."),),
         "spiking_resnet19_cifar": ((r"^classifier\.0\.", "head_fc."), (r"^classifier\.2\.", "fc."))}
PREACT_RENAMES = ((r"(layer\d+\.\d+)\.conv(\d)\.0\.", r"\1.conv\2."), (r"(layer\d+\.\d+)\.conv(\d)\.1\.", r"\1.bn\2."))
RENAMES = {name: CIFAR_RENAMES + head for name, head in HEADS.items()}
RENAMES["spiking_preact_resnet34"] = PREACT_RENAMES
CONV_BN = (("conv1", "bn1"), ("conv2", "bn2"), ("downsample.0", "downsample.1"))


def official_state_dict(checkpoint: dict) -> dict:
    """The weights of an official checkpoint: its ``best_net`` entry (or the dict itself),
    without DDP's ``module.`` prefix."""
    state = checkpoint.get("best_net", checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"official checkpoint: 'best_net' is a {type(state).__name__}, expected a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _rename(state: dict, rules) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _fold_conv_biases(state: dict, model: nn.Module) -> dict:
    """Fold the bias of every conv that fullrange builds without one into its BN's running_mean."""
    own = model.state_dict()
    state = dict(state)
    for key in [k for k in state if k.endswith(".bias") and k not in own]:
        for conv, bn in CONV_BN:
            prefix = key[:-len(f"{conv}.bias")]
            mean = f"{prefix}{bn}.running_mean"
            if key == f"{prefix}{conv}.bias" and mean in state:
                state[mean] = state[mean] - state.pop(key).to(state[mean].dtype)
                break
    return state


def convert_official(checkpoint: dict, name: str, model: nn.Module) -> dict:
    """An official checkpoint (or its state_dict) -> a state_dict that ``model`` (the fullrange
    student ``name``) loads strictly. ValueError names the keys that do not fit."""
    if name not in RENAMES:
        raise ValueError(f"no official layout is known for {name!r}; known: {', '.join(RENAMES)}")
    state = _fold_conv_biases(_rename(official_state_dict(checkpoint), RENAMES[name]), model)
    own = model.state_dict()
    extra, missing = sorted(set(state) - set(own)), sorted(set(own) - set(state))
    if extra or missing:
        raise ValueError(f"official checkpoint does not fit {name}: unexpected keys {extra[:6]}, "
                         f"missing keys {missing[:6]}")
    wrong = [k for k in own if state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"official checkpoint does not fit {name}: {wrong[0]} has shape "
                         f"{tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
    return state


def load_official(path: str | Path, name: str, model: nn.Module) -> nn.Module:
    """Load the official checkpoint file ``path`` into ``model`` (the fullrange student ``name``)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(convert_official(checkpoint, name, model))
    return model
