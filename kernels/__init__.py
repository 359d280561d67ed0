"""Triton kernels for fullrange, installed as fullrange.kernels (importable without a GPU).

Submodules import lazily, so ``import fullrange.kernels`` never touches triton:
    lif   multi-step LIF forward/backward (``lif_multistep_triton``), a torch.library custom op
"""

__all__ = ["lif_multistep_triton"]


def __getattr__(name):
    if name == "lif_multistep_triton":
        from .lif import lif_multistep_triton

        return lif_multistep_triton
    raise AttributeError(f"module 'fullrange.kernels' has no attribute {name!r}")
