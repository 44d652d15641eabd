"""The GPU step's JAX wrapper and constants, checked on the CPU.

The Triton kernels themselves compile and run only on a GPU
(``tests/test_gpu_kernels.py``, marked ``gpu``). What does not need a GPU
is checked here: the compile-time constants
(:func:`pallas_kernels.gpu.step.kernel_constants`) for awkward layouts, and
that :func:`pallas_kernels.gpu.step.microadam_step_gpu` calls each kernel
with the arguments its signature declares, its grid, the state aliased in
place and the warps chosen. ``jax_triton`` and the kernel module (which
imports ``triton``) are replaced by stand-ins; the kernels' signatures are
read from ``pallas_kernels/gpu/step_kernel.py`` with :mod:`ast`, so the
test follows the real source.
"""

from __future__ import annotations

import ast
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microadam_optax._layout import leaf_layout
from pallas_kernels.gpu import step as gpu_step

KERNEL_SOURCE = (pathlib.Path(gpu_step.__file__).parent / "step_kernel.py")

LAYOUTS = [  # (size, block, density)
    (4096 * 11008, 4096, 0.01), (3 * 4096, 4096, 0.01), (1000, 250, 0.05),
    (64, 8, 0.3), (5 * 8192 + 6, 8192, 0.02), (3 * 32768, 32768, 0.01),
    (2**31 + 3 * 4096 + 1000, 4096, 0.01), (10, 10, 0.5), (4098, 2, 0.5),
]


def _signature(name: str) -> tuple[list[str], list[str]]:
  """(pointer and scalar parameters, constexpr parameters) of a kernel."""
  tree = ast.parse(KERNEL_SOURCE.read_text())
  fn = next(n for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name == name)
  runtime, constexpr = [], []
  for arg in fn.args.args:
    is_constexpr = (arg.annotation is not None
                    and ast.unparse(arg.annotation) == "tl.constexpr")
    (constexpr if is_constexpr else runtime).append(arg.arg)
  return runtime, constexpr


@pytest.mark.parametrize("size,block,density", LAYOUTS)
@pytest.mark.parametrize("num_warps,sub", [(None, 8), (1, 8), (4, 4),
                                           (8, 16), (16, 64)])
def test_kernel_constants_tile_every_block(size, block, density, num_warps,
                                           sub):
  lay = leaf_layout(size, topk_block_size=block, quant_block_size=block,
                    density=density, error_bits=4)
  c = gpu_step.kernel_constants(size, block_size=lay.topk_block, k=lay.k,
                                last_block_k=lay.last_k, window=10,
                                num_warps=num_warps, sub_per_thread=sub)
  pow2 = lambda n: n >= 1 and n & (n - 1) == 0
  assert c["NB"] == lay.num_topk_blocks
  assert (c["NB"] - 1) * c["B"] + c["LAST_LEN"] == size
  assert 0 < c["LAST_LEN"] <= c["B"]
  assert pow2(c["TILE"]) and c["B"] <= c["TILE"] < 2 * c["B"]
  assert c["RW"] == min(8, c["TILE"]) and c["TILE"] % c["RW"] == 0
  # Pass C's sub-tiles are whole rows and cover the tile exactly.
  assert pow2(c["SUB"]) and c["TILE"] % c["SUB"] == 0
  assert c["SUB"] % c["RW"] == 0
  warps = num_warps or gpu_step.default_num_warps(block)
  assert c["SUB"] == min(c["TILE"], 32 * warps * sub)
  assert 1 <= c["LAST_K"] <= c["K"] <= c["KP"] < 2 * c["K"]
  assert c["E"] == 10 * c["K"] and pow2(c["EP"]) and c["E"] <= c["EP"]
  assert c["WIDE_KEYS"] == (c["B"] * c["EP"] >= 2**31)


def test_default_warps():
  assert gpu_step.default_num_warps(4096) == 4
  assert gpu_step.default_num_warps(250) == 1
  assert gpu_step.default_num_warps(32768) == 16
  assert gpu_step.default_u_num_warps(410) == 1
  assert gpu_step.default_u_num_warps(5000) == 16


class _Recorder:
  """A stand-in for ``jax_triton.triton_call`` that records its calls."""

  def __init__(self):
    self.calls = []

  def triton_call(self, *args, kernel, out_shape, grid, num_warps,
                  num_stages, input_output_aliases=None, **constants):
    self.calls.append(dict(kernel=kernel, args=args, out_shape=out_shape,
                           grid=grid, num_warps=num_warps,
                           aliases=input_output_aliases or {},
                           constants=constants))
    if isinstance(out_shape, (list, tuple)):
      return [jnp.zeros(s.shape, s.dtype) for s in out_shape]
    return jnp.zeros(out_shape.shape, out_shape.dtype)


@pytest.fixture
def recorder(monkeypatch):
  rec = _Recorder()
  monkeypatch.setitem(sys.modules, "jax_triton",
                      types.SimpleNamespace(triton_call=rec.triton_call))
  fake = types.ModuleType("pallas_kernels.gpu.step_kernel")
  for name in ("microadam_topk_kernel", "microadam_u_kernel",
               "microadam_apply_kernel"):
    runtime, constexpr = _signature(name)
    setattr(fake, name, types.SimpleNamespace(
        __name__=name, arg_names=runtime + constexpr,
        runtime=runtime, constexpr=constexpr))
  monkeypatch.setitem(sys.modules, "pallas_kernels.gpu.step_kernel", fake)
  monkeypatch.setattr(sys.modules["pallas_kernels.gpu"], "step_kernel",
                      fake, raising=False)
  return rec


def _zero_state(d: int, block: int, m: int):
  """A leaf's layout (1 % density) and its zero state in the wrapper's
  argument order: codes, min, max, window indices and values."""
  lay = leaf_layout(d, topk_block_size=block, quant_block_size=block,
                    density=0.01, error_bits=4)
  nb, k = lay.num_topk_blocks, lay.k
  return lay, (jnp.zeros((nb, block // 2), jnp.uint8), jnp.zeros(nb),
               jnp.zeros(nb), jnp.zeros((m, nb, k), jnp.int16),
               jnp.zeros((m, nb, k), jnp.bfloat16))


@pytest.mark.parametrize("num_warps,sub", [(None, 8), (2, 4)])
def test_wrapper_calls_each_kernel_with_its_signature(recorder, num_warps,
                                                       sub):
  d, block, m = 3 * 4096 + 1000, 4096, 4
  lay, state = _zero_state(d, block, m)
  nb, k = lay.num_topk_blocks, lay.k
  g = jnp.asarray(np.random.default_rng(0).standard_normal((d,)),
                  jnp.bfloat16)
  out = gpu_step.microadam_step_gpu(
      g, *state, jnp.int32(3), block_size=block, k=k,
      last_block_k=lay.last_k, b1=0.9, b2=0.999, eps=1e-8,
      out_dtype=jnp.bfloat16, num_warps=num_warps, sub_per_thread=sub)
  u, widx, wval, codes, lo, hi = out
  assert u.shape == (d,) and u.dtype == jnp.bfloat16
  assert widx.shape == (m, nb, k) and wval.dtype == jnp.bfloat16
  assert codes.shape == (nb, block // 2) and lo.shape == hi.shape == (nb,)

  topk, ucall = recorder.calls
  want = gpu_step.kernel_constants(d, block_size=block, k=k,
                                   last_block_k=lay.last_k, window=m,
                                   num_warps=num_warps, sub_per_thread=sub)
  for call in (topk, ucall):
    kern = call["kernel"]
    # Every constexpr of the kernel, and nothing else, with its value.
    assert set(call["constants"]) == set(kern.constexpr)
    assert all(call["constants"][n] == want[n] for n in kern.constexpr)
    # Inputs then outputs fill the kernel's runtime parameters.
    outs = call["out_shape"]
    n_out = len(outs) if isinstance(outs, (list, tuple)) else 1
    assert len(call["args"]) + n_out == len(kern.runtime)
    assert call["grid"] == (nb,)
  assert topk["kernel"].__name__ == "microadam_topk_kernel"
  assert topk["num_warps"] == (num_warps or gpu_step.default_num_warps(block))
  # codes, min, max, window indices and values updated in place.
  assert topk["aliases"] == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
  assert ucall["kernel"].__name__ == "microadam_u_kernel"
  assert ucall["num_warps"] == gpu_step.default_u_num_warps(want["EP"])
  assert ucall["aliases"] == {}


@pytest.mark.parametrize("weight_decay,decay", [(0.0, False), (0.1, True),
                                                (None, True)])
def test_wrapper_fuses_the_parameter_update(recorder, weight_decay, decay):
  # With a parameter, the second kernel is the apply kernel, the parameter
  # updated in place; a Python zero weight decay skips its dense pass, a
  # traced one (None here) cannot.
  d, block, m = 2 * 4096 + 10, 4096, 3
  lay, state = _zero_state(d, block, m)
  nb, k = lay.num_topk_blocks, lay.k

  @jax.jit
  def step(g, p, lr, wd):
    return gpu_step.microadam_step_gpu(
        g, *state, jnp.int32(2), block_size=block, k=k,
        last_block_k=lay.last_k, b1=0.9, b2=0.999, eps=1e-8,
        out_dtype=jnp.bfloat16, param=p, learning_rate=lr,
        weight_decay=weight_decay if weight_decay is not None else wd)

  new_p, *_ = step(jnp.ones((d,), jnp.bfloat16), jnp.ones((d,), jnp.float32),
                   jnp.float32(1e-3), jnp.float32(0.1))
  assert new_p.shape == (d,) and new_p.dtype == jnp.float32
  _, call = recorder.calls
  kern = call["kernel"]
  assert kern.__name__ == "microadam_apply_kernel"
  want = gpu_step.kernel_constants(d, block_size=block, k=k,
                                   last_block_k=lay.last_k, window=m)
  assert set(call["constants"]) == set(kern.constexpr)
  assert call["constants"]["DECAY"] is decay
  assert call["constants"]["CHUNK"] == min(want["TILE"],
                                           gpu_step.APPLY_CHUNK)
  assert all(call["constants"][n] == want[n] for n in kern.constexpr
             if n not in ("DECAY", "CHUNK"))
  assert len(call["args"]) + 1 == len(kern.runtime)
  # The parameter is the last input and the only output: in place.
  assert call["aliases"] == {len(call["args"]) - 1: 0}
  assert call["args"][-1].shape == (d,)
  assert call["grid"] == (nb,)
  assert call["num_warps"] == gpu_step.default_u_num_warps(want["EP"])


def test_wrapper_refuses_a_parameter_of_another_size(recorder):
  d, block = 4096, 4096
  args = (jnp.zeros((d,), jnp.bfloat16), jnp.zeros((1, block // 2),
                                                     jnp.uint8),
          jnp.zeros(1), jnp.zeros(1), jnp.zeros((2, 1, 41), jnp.int16),
          jnp.zeros((2, 1, 41), jnp.bfloat16), jnp.int32(1))
  kw = dict(block_size=block, k=41, last_block_k=41, b1=0.9, b2=0.999,
            eps=1e-8, out_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="param must have as many elements"):
    gpu_step.microadam_step_gpu(*args, **kw, param=jnp.zeros((d - 1,)),
                                learning_rate=0.1)
  with pytest.raises(ValueError, match="learning_rate must be given"):
    gpu_step.microadam_step_gpu(*args, **kw, param=jnp.zeros((d,)))


def test_wrapper_refuses_codes_of_another_layout(recorder):
  d, block = 3 * 4096, 4096
  with pytest.raises(ValueError, match="one row per block"):
    gpu_step.microadam_step_gpu(
        jnp.zeros((d,), jnp.bfloat16), jnp.zeros((2, block // 2), jnp.uint8),
        jnp.zeros(2), jnp.zeros(2), jnp.zeros((2, 2, 41), jnp.int16),
        jnp.zeros((2, 2, 41), jnp.bfloat16), jnp.int32(1), block_size=block,
        k=41, last_block_k=41, b1=0.9, b2=0.999, eps=1e-8,
        out_dtype=jnp.bfloat16)
  assert not recorder.calls


def test_jit_traces_the_wrapper(recorder):
  # Traced under jit (b1, b2, eps and the count traced), as the optimizer
  # calls it.
  d, block, m = 8192, 4096, 3
  lay = leaf_layout(d, topk_block_size=block, quant_block_size=block,
                    density=0.01, error_bits=4)
  nb, k = lay.num_topk_blocks, lay.k

  @jax.jit
  def step(g, count, b1):
    return gpu_step.microadam_step_gpu(
        g, jnp.zeros((nb, block // 2), jnp.uint8), jnp.zeros(nb),
        jnp.zeros(nb), jnp.zeros((m, nb, k), jnp.int16),
        jnp.zeros((m, nb, k), jnp.float32), count, block_size=block, k=k,
        last_block_k=lay.last_k, b1=b1, b2=0.999, eps=1e-8,
        out_dtype=jnp.float32)

  u, *_ = step(jnp.ones((d,), jnp.float32), jnp.int32(5), jnp.float32(0.9))
  assert u.shape == (d,) and len(recorder.calls) == 2
