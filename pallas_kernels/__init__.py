"""Kernels for MicroAdam's hot paths, usable without the optimizer.

* :mod:`pallas_kernels.topk` -- block-wise Top-K by magnitude.
* :mod:`pallas_kernels.quantize` -- block-wise asymmetric 4/8-bit quantization
  with packing.
* :mod:`pallas_kernels.error_feedback` -- the fused error-feedback pass
  (dequantize + add, Top-K, zero, re-quantize in one pass).
* :mod:`pallas_kernels.window` -- Adam's moments rebuilt from a window of
  sparse gradients, and the fused parameter update.

Each module holds a pure-``jnp`` reference (the XLA path, correct on every
back end), a Pallas kernel (``*_pallas``: Triton on GPU, interpret mode on
CPU; Mosaic on TPU for the quantization) and a dispatch function taking
``implementation="auto" | "xla" | "pallas"``. Back-end specifics (compiler
parameters, warps, programs, which kernels exist on TPU) live in
:mod:`pallas_kernels._backend`.
"""

from pallas_kernels import error_feedback
from pallas_kernels import quantize
from pallas_kernels import topk
from pallas_kernels import window

__all__ = ["error_feedback", "quantize", "topk", "window"]
