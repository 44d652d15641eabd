"""Kernels for MicroAdam's hot path, usable without the optimizer.

MicroAdam's per-leaf step (error feedback, block Top-K, 4-bit
re-quantization, the window's new row and the update direction rebuilt from
the window) has a pure-``jnp`` reference, correct on every back end, and
kernels per platform; :mod:`pallas_kernels.dispatch` decides in one place
which runs (:func:`pallas_kernels.dispatch.leaf_step`):

=====================  ==================================================
module                 what it holds
=====================  ==================================================
``dispatch``           the choice per lowering platform, layout and code
                       width; :class:`~pallas_kernels.dispatch.KernelConfig`
                       (tuning knobs); the step's XLA reference
``topk``, ``quantize``,  the references of each stage (the XLA path)
``error_feedback``,
``window``
``gpu.step``           the GPU kernels: the whole step in two Triton kernels
                       (official Triton through ``jax-triton``), any leaf
                       size
``tpu.error_feedback``,  the Mosaic TPU kernels (error feedback; window)
``tpu.window``
=====================  ==================================================

What ran where: the GPU kernel compiled and timed on an H200 (JAX 0.11.2,
Triton 3.6, jax-triton 0.3.1) and, for its logic, in Triton's interpreter;
the Mosaic TPU kernels were only lowered for TPU from a CPU host and run in
the TPU interpreter and Pallas' generic interpreter against their
references: no TPU was reachable, so they were never compiled by the TPU
compiler nor run, and their speed is unknown. Pallas' Triton back end
(deprecated since JAX 0.11.0) is not used; Pallas' Mosaic GPU back end does
not lower the sort, prefix sum, gather and scatter the GPU step needs
(``experiments/mosaic_gpu_probe.py``).
"""

from pallas_kernels import dispatch
from pallas_kernels import error_feedback
from pallas_kernels import quantize
from pallas_kernels import topk
from pallas_kernels import window

__all__ = ["dispatch", "error_feedback", "quantize", "topk", "window"]
