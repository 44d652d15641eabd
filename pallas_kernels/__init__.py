"""Kernels for MicroAdam's hot paths, usable without the optimizer.

* :mod:`pallas_kernels.topk` -- block-wise Top-K by magnitude.
* :mod:`pallas_kernels.quantize` -- block-wise asymmetric 4/8-bit quantization
  with packing.
* :mod:`pallas_kernels.window` -- Adam's moments rebuilt from a window of
  sparse gradients.

Each module holds a pure-``jnp`` reference (the XLA path, correct on every
back end).
"""

from pallas_kernels import quantize
from pallas_kernels import topk
from pallas_kernels import window

__all__ = ["quantize", "topk", "window"]
