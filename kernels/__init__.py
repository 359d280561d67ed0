"""Kernels for fullrange, installed as fullrange.kernels (importable without a GPU or numba).

Submodules import lazily, so ``import fullrange.kernels`` touches neither triton nor numba:
    lif       multi-step LIF forward/backward in Triton (``lif_multistep_triton``), CUDA
    lif_cpu   the same on the CPU in numba (``lif_multistep_cpu``), float32/float64
    bn_lif    BatchNorm (+ residual) + LIF fused in Triton (``bn_lif_triton``), CUDA
    bn_lif_cpu  BatchNorm (+ residual, + a downsample's BatchNorm) + LIF fused in numba, CPU
              (fullrange.models.unit_cpu wraps it)
"""

__all__ = ["lif_multistep_triton", "lif_multistep_cpu"]


def __getattr__(name):
    if name == "lif_multistep_triton":
        from .lif import lif_multistep_triton

        return lif_multistep_triton
    if name == "lif_multistep_cpu":
        from .lif_cpu import lif_multistep_cpu

        return lif_multistep_cpu
    raise AttributeError(f"module 'fullrange.kernels' has no attribute {name!r}")
