"""Back-end specifics of the Pallas kernels, in one place.

Every kernel module asks this module three things: which implementation a
caller's ``implementation`` argument resolves to (:func:`resolve`), whether a
Pallas kernel must run in interpret mode (:func:`interpret_mode`), and which
compiler parameters suit the back end it is lowered for (:func:`gpu_params`,
:func:`tpu_params`).

* GPU kernels are written for the Triton back end of Pallas
  (``jax.experimental.pallas.triton``): they use masked and scattered
  loads/stores, atomics and ``jnp.cumsum``, which Mosaic GPU does not lower.
  The number of warps per program is the one tuning knob; it is chosen here
  from the number of elements a program holds on chip.
* TPU kernels (Mosaic TPU) exist for the block-wise quantization only; the
  other hot paths use their XLA reference on TPU (see :data:`TPU_KERNELS`).
* On CPU every Pallas kernel runs with ``interpret=True``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

IMPLEMENTATIONS = ("auto", "xla", "pallas")

#: Kernel families that have a Mosaic TPU version. The others fall back to
#: their XLA reference under ``implementation="auto"`` on TPU.
TPU_KERNELS = frozenset({"quantize", "dequantize"})


def backend() -> str:
  """The default JAX back end: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
  return jax.default_backend()


def resolve(implementation: str, kernel: str | None = None) -> str:
  """Resolves ``"auto"`` to ``"pallas"`` or ``"xla"`` for the default back end.

  Args:
    implementation: ``"auto"``, ``"xla"`` or ``"pallas"``.
    kernel: the kernel family (e.g. ``"topk"``); on TPU, ``"auto"`` picks the
      kernel only for the families in :data:`TPU_KERNELS`.

  Returns:
    ``"xla"`` or ``"pallas"``.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS}, got "
        f"{implementation!r}.")
  if implementation != "auto":
    return implementation
  b = backend()
  if b == "gpu":
    return "pallas"
  if b == "tpu" and (kernel is None or kernel in TPU_KERNELS):
    return "pallas"
  return "xla"


def interpret_mode(interpret: bool | None = None) -> bool:
  """``interpret`` if given, else ``True`` when the default is no GPU/TPU."""
  if interpret is not None:
    return bool(interpret)
  return backend() not in ("gpu", "tpu")


def next_pow2(n: int) -> int:
  """Smallest power of two ``>= max(n, 1)``."""
  n = max(int(n), 1)
  return 1 << (n - 1).bit_length()


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


#: Elements per warp that suit each kernel (measured on an H200, see
#: benchmarks/NOTES_kernels.md): the Top-K kernels spend most of their
#: instructions in per-program scalar work and reductions, so they want more
#: elements per thread; the window kernel waits on memory and wants warps.
_ELEMENTS_PER_WARP = {"error_feedback": 1024, "topk": 1024, "window": 512}


def num_warps(elements: int, kernel: str = "") -> int:
  """Warps per Triton program holding ``elements`` values on chip.

  The environment variable ``PALLAS_KERNELS_NUM_WARPS_<KERNEL>`` (upper
  case) overrides it, for tuning sweeps.
  """
  override = _env_int(f"PALLAS_KERNELS_NUM_WARPS_{kernel.upper()}")
  if override:
    return override
  return max(1, min(16, elements // _ELEMENTS_PER_WARP.get(kernel, 512)))


def rows_per_program(num_blocks: int, kernel: str = "", target: int = 1
                     ) -> int:
  """Blocks one GPU program holds (a power of two dividing ``num_blocks``).

  Several blocks per program let their reductions and memory round trips
  overlap (one program's latency serves all its rows).
  ``PALLAS_KERNELS_ROWS_<KERNEL>`` overrides ``target``.
  """
  target = _env_int(f"PALLAS_KERNELS_ROWS_{kernel.upper()}") or target
  rows = 1
  while rows * 2 <= target and num_blocks % (rows * 2) == 0:
    rows *= 2
  return rows


def gpu_params(elements: int, kernel: str = "") -> Any:
  """Triton compiler parameters for a program holding ``elements`` values."""
  return pltriton.CompilerParams(num_warps=num_warps(elements, kernel),
                                 num_stages=1)


def tpu_params() -> Any:
  """Mosaic TPU compiler parameters: every grid axis is independent."""
  return pltpu.CompilerParams(dimension_semantics=("parallel",))


def persistent_programs(num_blocks: int) -> int:
  """Programs of a persistent GPU grid that loops over ``num_blocks`` blocks.

  Kernels that keep a per-program scratch area in global memory (the window
  kernel) launch a fixed number of programs, so that the scratch stays small
  and in the L2 cache. Four programs per multiprocessor of an H100/H200;
  ``PALLAS_KERNELS_PROGRAMS`` overrides it.
  """
  override = _env_int("PALLAS_KERNELS_PROGRAMS")
  target = override or 4 * 132
  return max(1, min(num_blocks, target))


def barrier(interpret: bool) -> None:
  """Synchronizes the threads of one GPU program (no-op in interpret mode).

  Interpret mode runs a program as one sequential computation, which needs
  no barrier (and has no rule for Triton's).
  """
  if not interpret:
      pltriton.debug_barrier()
