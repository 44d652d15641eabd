"""MicroAdam's GPU kernels in Triton's interpreter: the checks, run in a fresh
process by ``tests/test_gpu_kernels_interpreted.py``.

  python tests/triton_interpreted.py

``TRITON_INTERPRET`` must be set before Triton is first imported (Triton's
own ``@triton.jit`` library functions, ``tl.xor_sum`` among them, are
wrapped then), so this runs apart from the test session; importing this
module imports neither Triton nor PyTorch (the test reads :func:`checks`'
names). Prints one JSON line per check, ``{"name": ..., "ok": ..., ...}``.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np

from benchmarks import step_kernel
from pallas_kernels import window as window_lib
from pallas_kernels.gpu import step as gpu_step

# (seed, size, block, density, window, count): the GPU tests' small cases.
CASES = [c for c in step_kernel.CASES if c[1] <= 50_000]
#: The cases the fused parameter update is checked on, each without and
#: with weight decay.
APPLY_CASES = CASES[:4]

# Set by main(), after TRITON_INTERPRET: PyTorch and the kernel module.
torch = None
kernels = None


def _torch(x):
  x = np.asarray(x)
  if x.dtype == jnp.bfloat16:
    return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
  return torch.from_numpy(x.copy())


def _jax(x):
  if x.dtype == torch.bfloat16:
    return jnp.asarray(x.float().numpy()).astype(jnp.bfloat16)
  return jnp.asarray(x.numpy())


def _run(lay, state, g, count, *, param=None, lr=0.5, wd=0.0):
  """One step of the kernels on torch copies of ``state``: ``(u or the new
  parameter, *new state)`` as JAX arrays."""
  iw, vw, codes, lo, hi = (_torch(x) for x in state)
  m = iw.shape[0]
  constants = gpu_step.kernel_constants(
      lay.size, block_size=lay.topk_block, k=lay.k, last_block_k=lay.last_k,
      window=m)
  w1, w2 = (_torch(w) for w in window_lib.row_weights(
      jnp.int32(count), m, step_kernel.B1, step_kernel.B2))
  row = torch.tensor([(count - 1) % m], dtype=torch.int32)
  eps = torch.tensor([step_kernel.EPS], dtype=torch.float32)
  grid = (codes.shape[0],)
  topk = kernels.microadam_topk_kernel
  topk[grid](_torch(g), codes, lo, hi, iw, vw, row, codes, lo, hi, iw, vw,
             **gpu_step.constants_of(topk, constants))
  if param is None:
    first = torch.empty(lay.size, dtype=torch.bfloat16)
    u_kernel = kernels.microadam_u_kernel
    u_kernel[grid](iw, vw, w1, w2, row, eps, first,
                   **gpu_step.constants_of(u_kernel, constants))
  else:
    first = _torch(param)
    apply = kernels.microadam_apply_kernel
    apply[grid](iw, vw, w1, w2, row, eps,
                torch.tensor([lr], dtype=torch.float32),
                torch.tensor([wd], dtype=torch.float32), first, first,
                **gpu_step.constants_of(apply, constants), DECAY=wd != 0.0,
                CHUNK=min(constants["TILE"], gpu_step.APPLY_CHUNK))
  return tuple(_jax(x) for x in (first, iw, vw, codes, lo, hi))


def _truncate_to_bf16(x: np.ndarray) -> np.ndarray:
  """float32 to bf16 as the interpreter casts: the low 16 bits dropped."""
  return (x.view(np.uint32) & 0xFFFF0000).view(np.float32)


def check_topk_and_u(case, *, zero=False, grad_zero=False) -> dict:
  """The Top-K and ``u`` kernels against the reference: ``compare``'s
  criteria (window rows' indices equal and values within one bf16 step,
  codes within one level for at most 1 %, min/max, ``u`` within 1 %)."""
  return step_kernel.check_case(*case, zero=zero, grad_zero=grad_zero,
                                run=_run, value_steps=1)


def check_apply(case, weight_decay: float) -> dict:
  """The fused update (``step_kernel.check_apply_case``): the new bf16
  parameter within one bf16 step of ``p - lr (u + wd p)`` rounded, 99 % of
  it equal to it truncated (the interpreter's cast); only the window's
  entries moved without weight decay, all of them with it."""
  res = step_kernel.check_apply_case(*case, weight_decay=weight_decay,
                                     run=_run, cast=_truncate_to_bf16,
                                     value_steps=1)
  res["ok"] = bool(res["ok"] and (
      res["param_moved_off_window"] == 0 if weight_decay == 0.0
      else res["param_changed"] >= 0.99 * res["d"]))
  return res


def checks():
  """``(name, thunk)`` of every check, names as the tests' ids."""
  out = [(f"topk_u_d{c[1]}_B{c[2]}_m{c[4]}",
          lambda c=c: check_topk_and_u(c)) for c in CASES]
  out += [(f"ties_grad_zero_{z}",
           lambda z=z: check_topk_and_u((6, 3 * 4096, 4096, 0.01, 4, 2),
                                        zero=True, grad_zero=z))
          for z in (True, False)]
  out += [(f"apply_d{c[1]}_B{c[2]}_wd{wd}",
           lambda c=c, wd=wd: check_apply(c, wd))
          for c in APPLY_CASES for wd in (0.0, 0.1)]
  return out


def main() -> None:
  global torch, kernels  # pylint: disable=global-statement
  os.environ["TRITON_INTERPRET"] = "1"
  import torch as torch_module
  from pallas_kernels.gpu import step_kernel as kernel_module
  torch, kernels = torch_module, kernel_module
  for name, run in checks():
    print(json.dumps({"name": name, **run()}), flush=True)


if __name__ == "__main__":
  main()
