"""The counter-based hash behind every replayable random draw (splitmix64), written once.

All integers are uint64, arithmetic modulo 2**64 (HASH_VERSION "splitmix64-v1"):
    mix(z)      = splitmix64's finaliser of z + 0x9E3779B97F4A7C15
    key         = mix(mix(mix(seed) ^ epoch) ^ index)         per (seed, augmentation epoch, sample)
    word(key,k) = mix(key ^ k)                                 the k-th draw of a sample
    below(w, n) = ((w >> 32) * n) >> 32                        in [0, n) (Lemire; bias <= n / 2**32)
    unit(w)     = (w >> 11) * 2**-53                           a double in [0, 1)
Words in use: 0, 1, 2 (pad-crop-flip: dy, dx, flip), 8..47 (random resized crop), 64..70
(AutoAugment and Cutout). below(w, 2) is w's top bit.

The functions are numba-compiled: the FFCV decoders call them per sample, and
:func:`draws` computes a batch's draws on the host (from its CPU indices) for the ops that run
on the device batch, which then copy a few int64 per sample to the device.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

HASH_VERSION = "splitmix64-v1"
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_U11, _U27, _U30, _U31, _U32 = (np.uint64(v) for v in (11, 27, 30, 31, 32))
_INV53 = 1.0 / 9007199254740992.0  # 2**-53
_M64 = (1 << 64) - 1


@njit(cache=True, nogil=True)
def mix(z):
    z = z + _GOLDEN
    z = (z ^ (z >> _U30)) * _C1
    z = (z ^ (z >> _U27)) * _C2
    return z ^ (z >> _U31)


@njit(cache=True, nogil=True)
def view_key(seed, epoch, index):
    """The per-sample key; seed, epoch, index are uint64 (the bits of the Python ints)."""
    return mix(mix(mix(seed) ^ epoch) ^ index)


@njit(cache=True, nogil=True)
def unit(word):
    return np.float64(word >> _U11) * _INV53


@njit(cache=True, nogil=True)
def below(word, n):
    return np.int64(((word >> _U32) * np.uint64(n)) >> _U32)


@njit(cache=True, nogil=True)
def _draws(seed, epoch, indices, ks, ns, out):
    for b in range(len(indices)):
        key = view_key(seed, epoch, np.uint64(indices[b]))
        for j in range(len(ks)):
            out[j, b] = below(mix(key ^ np.uint64(ks[j])), ns[j])


def u64(v: int) -> np.uint64:
    """The uint64 with the bits of the Python int v (negative ints wrap)."""
    return np.uint64(int(v) & _M64)


def draws(seed: int, epoch: int, indices, ks, ns) -> torch.Tensor:
    """below(word(key, ks[j]), ns[j]) for every sample: int64 [len(ks), B] on the CPU.
    indices: int [B] sample indices on the CPU (a tensor or an array)."""
    idx = np.ascontiguousarray(np.asarray(indices, dtype=np.int64).reshape(-1))
    ks_ = np.asarray(ks, dtype=np.int64)
    ns_ = np.asarray(ns, dtype=np.int64)
    if ks_.shape != ns_.shape or (ns_ < 1).any():
        raise ValueError(f"draws: ks {tuple(ks_)} and ns {tuple(ns_)} must pair up, every n >= 1")
    out = np.empty((len(ks_), len(idx)), np.int64)
    _draws(u64(seed), u64(epoch), idx, ks_, ns_, out)
    return torch.from_numpy(out)
