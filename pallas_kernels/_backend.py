"""Back-end specifics of the Pallas kernels, in one place.

Every kernel module asks this module which implementation runs
(:func:`per_platform`: the reference, the Triton kernel or the Mosaic TPU
kernel, chosen per *lowering* platform) and which compiler parameters suit
the back end a kernel is lowered for (:func:`gpu_params`, :func:`tpu_params`).

* The choice is made with :func:`jax.lax.platform_dependent`: one traced
  function lowers to the Triton kernels for ``"cuda"``/``"rocm"``, to the
  Mosaic kernels for ``"tpu"`` and to the XLA reference (or, with
  ``implementation="pallas"``, an interpreted kernel) for ``"cpu"``,
  whichever host traced it. Lowering for one platform keeps only its branch.
  Lowering for several platforms at once (``jax.export`` with
  ``platforms=("cpu", "tpu")``) fails with JAX 0.10: every ``pallas_call`` in
  any branch is lowered for every platform of the module (jax-ml/jax#28594);
  ``implementation="xla"`` exports for several platforms.
* GPU kernels are written for the Triton back end of Pallas
  (``jax.experimental.pallas.triton``): they use masked and scattered
  loads/stores, atomics and ``jnp.cumsum``, which Mosaic GPU does not lower.
  The number of warps per program is the one tuning knob; it is chosen here
  from the number of elements a program holds on chip.
* TPU kernels (Mosaic TPU) hold blocks as ``(8, 128)``-tiled 2-D arrays and
  use only vectorised compares, reductions and small matmuls (TPU has no
  scatter; see :mod:`pallas_kernels._onchip_tpu`). They exist for the
  families in :data:`TPU_KERNELS`. They were lowered for TPU and run in the
  TPU interpreter (``interpret=pltpu.InterpretParams()``) on CPU, never
  compiled or run on a TPU.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

IMPLEMENTATIONS = ("auto", "xla", "pallas")

#: Kernel families that have a Mosaic TPU version. (The fused parameter
#: update :func:`pallas_kernels.window.window_param_update` has none: it
#: takes its reference on TPU.)
TPU_KERNELS = frozenset({"quantize", "dequantize", "topk", "error_feedback",
                         "window"})

#: Which kernel bodies ``implementation="pallas"`` interprets on a platform
#: without kernels (CPU): ``"triton"`` (the GPU bodies with
#: ``interpret=True``) or ``"mosaic"`` (the TPU bodies in the TPU
#: interpreter). The environment variable ``PALLAS_KERNELS_INTERPRETER``
#: overrides it; it is read when a function is traced.
DEFAULT_INTERPRETER = "triton"
INTERPRETERS = ("triton", "mosaic")


def backend() -> str:
  """The default JAX back end: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
  return jax.default_backend()


def check_implementation(implementation: str) -> str:
  """Returns ``implementation`` after checking that it is a valid one."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS}, got "
        f"{implementation!r}.")
  return implementation


def interpreter() -> str:
  """``"triton"`` or ``"mosaic"``: see :data:`DEFAULT_INTERPRETER`."""
  name = os.environ.get("PALLAS_KERNELS_INTERPRETER") or DEFAULT_INTERPRETER
  if name not in INTERPRETERS:
    raise ValueError(f"PALLAS_KERNELS_INTERPRETER must be one of "
                     f"{INTERPRETERS}, got {name!r}.")
  return name


def is_tpu_interpret(interpret: Any) -> bool:
  """Whether ``interpret`` asks for the TPU interpreter."""
  return isinstance(interpret, pltpu.InterpretParams)


def per_platform(*args: Any, implementation: str, reference: Callable,
                 triton: Callable | None = None,
                 mosaic: Callable | None = None,
                 interpret: Any = None) -> Any:
  """Runs ``reference`` or a kernel on ``args``, chosen per lowering platform.

  The one place that decides which implementation of a kernel family runs.

  Args:
    *args: the operands, passed to whichever function runs.
    implementation: ``"xla"``: ``reference`` on every platform (no
      kernel is traced). ``"auto"``: per lowering platform, ``triton`` on
      ``cuda``/``rocm``, ``mosaic`` on ``tpu``, ``reference`` elsewhere.
      ``"pallas"``: the same, but elsewhere (CPU) a kernel in interpret mode
      (which one: :func:`interpreter`).
    reference: the pure-``jnp`` reference, ``reference(*args)``.
    triton: the Triton kernel, ``triton(*args, interpret=bool)``, or
      ``None`` (the reference takes its place).
    mosaic: the Mosaic TPU kernel, ``mosaic(*args, interpret=None |
      pltpu.InterpretParams)``, or ``None`` (the reference takes its place).
    interpret: only with ``"pallas"``: ``True`` runs the Triton kernel in
      interpret mode and a :class:`pltpu.InterpretParams` the Mosaic kernel
      in the TPU interpreter, whatever the platform; ``False``: the compiled
      kernel of the lowering platform (CPU: the reference); ``None``: the
      compiled kernel, interpreted on CPU.

  Returns:
    What the chosen function returns (all must return the same types).
  """
  implementation = check_implementation(implementation)
  if implementation == "xla" or (triton is None and mosaic is None):
    return reference(*args)
  if implementation == "pallas" and interpret is not None and (
      interpret is not False):
    if mosaic is not None and (is_tpu_interpret(interpret) or triton is None):
      return mosaic(*args, interpret=interpret if is_tpu_interpret(interpret)
                    else pltpu.InterpretParams())
    return triton(*args, interpret=True)

  def gpu(*a):
    return reference(*a) if triton is None else triton(*a, interpret=False)

  def tpu(*a):
    return reference(*a) if mosaic is None else mosaic(*a, interpret=None)

  def other(*a):
    if implementation == "auto" or interpret is False:
      return reference(*a)
    if mosaic is not None and (interpreter() == "mosaic" or triton is None):
      return mosaic(*a, interpret=pltpu.InterpretParams())
    return triton(*a, interpret=True)

  return jax.lax.platform_dependent(*args, cuda=gpu, rocm=gpu, tpu=tpu,
                                    default=other)


def interpret_mode(interpret: bool | None = None) -> bool:
  """``interpret`` if given, else ``True`` when the default is no GPU/TPU."""
  if interpret is not None:
    return bool(interpret)
  return backend() not in ("gpu", "tpu")

#: Flat offsets in the Triton kernels are int32.
INT32_ELEMENTS = 2**31 - 1


def triton_addressable(elements: int) -> bool:
  """Whether a Triton kernel can index a flat buffer of ``elements``.

  Larger tensors take the reference on GPU (the family's dispatch passes no
  Triton kernel to :func:`per_platform`, which then never traces it).
  """
  return int(elements) <= INT32_ELEMENTS


def next_pow2(n: int) -> int:
  """Smallest power of two ``>= max(n, 1)``."""
  n = max(int(n), 1)
  return 1 << (n - 1).bit_length()


#: Elements per warp that suit each kernel (device-timed on an H200,
#: 2026-12-01, see benchmarks/NOTES_kernels.md): the Top-K and
#: error-feedback kernels spend most of their instructions in per-element
#: counting and the Top-K store, 4 warps per 4096-element block (0.306 ms
#: on a 4096 x 11008 tensor; 8 warps 0.308 ms, 16 warps slower); the window
#: kernel waits on the L2 and wants warps: 16 per program (0.199 ms against
#: 0.220 ms with 8).
_ELEMENTS_PER_WARP = {"error_feedback": 1024, "topk": 1024, "window": 256}


def num_warps(elements: int, kernel: str = "") -> int:
  """Default warps per Triton program holding ``elements`` values on chip.

  Kernels take an explicit ``num_warps`` argument that overrides it (tuning
  sweeps pass it; nothing is read from the environment).
  """
  return max(1, min(16, elements // _ELEMENTS_PER_WARP.get(kernel, 512)))


def rows_per_program(num_blocks: int, target: int = 1) -> int:
  """Blocks one GPU program holds: the largest power of two ``<= target``
  that divides ``num_blocks``.

  Several blocks per program let their reductions and memory round trips
  overlap (one program's latency serves all its rows); kernels take the
  ``target`` as an explicit ``rows`` argument (default 1, the fastest
  measured).
  """
  target = max(1, int(target))
  rows = 1
  while rows * 2 <= target and num_blocks % (rows * 2) == 0:
    rows *= 2
  return rows


def gpu_params(elements: int, kernel: str = "",
               warps: int | None = None) -> Any:
  """Triton compiler parameters for a program holding ``elements`` values.

  ``warps``: the kernel's explicit ``num_warps`` argument (``None``: the
  default of :func:`num_warps`).
  """
  return pltriton.CompilerParams(
      num_warps=int(warps) if warps else num_warps(elements, kernel),
      num_stages=1)


def tpu_params() -> Any:
  """Mosaic TPU compiler parameters: every grid axis is independent."""
  return pltpu.CompilerParams(dimension_semantics=("parallel",))


def persistent_programs(num_blocks: int, programs: int | None = None) -> int:
  """Programs of a persistent GPU grid that loops over ``num_blocks`` blocks.

  Kernels that keep a per-program scratch area in global memory (the window
  kernel) launch a fixed number of programs, so that the scratch stays small
  and in the L2 cache. ``programs``: the kernel's explicit argument;
  default four programs per multiprocessor of an H100/H200.
  """
  target = int(programs) if programs else 4 * 132
  return max(1, min(num_blocks, target))


def barrier(interpret: bool) -> None:
  """Synchronizes the threads of one GPU program (no-op in interpret mode).

  Interpret mode runs a program as one sequential computation, which needs
  no barrier (and has no rule for Triton's).
  """
  if not interpret:
      pltriton.debug_barrier()
