"""Kernels for MicroAdam's hot paths, usable without the optimizer.

* :mod:`pallas_kernels.topk` -- block-wise Top-K by magnitude.
* :mod:`pallas_kernels.quantize` -- block-wise asymmetric 4/8-bit quantization
  with packing.
* :mod:`pallas_kernels.error_feedback` -- the fused error-feedback pass
  (dequantize + add, Top-K, zero, re-quantize in one pass).
* :mod:`pallas_kernels.window` -- Adam's moments rebuilt from a window of
  sparse gradients, and the fused parameter update.

Each module holds a pure-``jnp`` reference (the XLA path, correct on every
back end), its Pallas kernels (``*_pallas``) and a dispatch function taking
``implementation="auto" | "xla" | "pallas"``. Which one runs is decided in
one place, :func:`pallas_kernels._backend.per_platform`, per *lowering*
platform (``jax.lax.platform_dependent``): a function traced once lowers to
the Triton kernels for ``"cuda"``, the Mosaic kernels for ``"tpu"`` and the
reference for ``"cpu"`` (``"pallas"``: an interpreted kernel there;
``"xla"``: the reference everywhere).

Kernels per platform:

============================  ===================  ===================
family                        GPU (Pallas Triton)  TPU (Pallas Mosaic)
============================  ===================  ===================
Top-K                         yes                  yes
error feedback (fused)        yes                  yes
window -> update ``u``        yes                  yes
window -> parameter update    yes                  no (reference)
4-bit quantize / dequantize   yes                  yes
8-bit quantize / dequantize   no (reference)       no (reference)
============================  ===================  ===================

What ran: the Triton kernels compiled and timed on an H200, and in
interpret mode on CPU. The Mosaic TPU kernels were only lowered (from a CPU
host, ``lowering_platforms=("tpu",)``: ``tpu_custom_call`` in the StableHLO)
and run in the TPU interpreter (``interpret=pltpu.InterpretParams()``)
against their references; no TPU was reachable, so they were never compiled
by the TPU compiler nor run, and their speed is unknown.
``PALLAS_KERNELS_INTERPRETER=mosaic`` makes ``"pallas"`` on CPU interpret
the Mosaic bodies instead of the Triton ones. Back-end specifics (compiler
parameters, warps, programs, TPU tiling) live in
:mod:`pallas_kernels._backend`.
"""

from pallas_kernels import error_feedback
from pallas_kernels import quantize
from pallas_kernels import topk
from pallas_kernels import window

__all__ = ["error_feedback", "quantize", "topk", "window"]
