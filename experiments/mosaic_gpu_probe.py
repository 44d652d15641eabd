"""What Pallas' Mosaic GPU back end lowers of what MicroAdam's GPU step needs.

MicroAdam's per-block step needs, inside one kernel program: a sort (or a
histogram) of the block's magnitudes for an exact Top-K, a prefix sum for
compaction, a gather from a register array (the new row's share of the
moments at the other rows' indices) and a data-dependent scatter (the
window's entries into the block's update). Each is tried here as the
smallest Mosaic GPU kernel, in both lowering semantics, beside an
element-wise control: lowered for ``"cuda"`` (which needs no GPU) and, on a
GPU, run and checked against NumPy. The outcome (or the first line of the
error) is printed and written as JSON.

The kernel is built with ``plgpu.kernel`` where JAX has it (0.11 on):
there ``pl.pallas_call`` has no Mosaic GPU lowering rule left (it fails
with a bare ``AssertionError`` for any body). On older JAX it is
``pl.pallas_call`` with ``plgpu.CompilerParams``.

  PYTHONPATH=. python experiments/mosaic_gpu_probe.py --json probe.json
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks import harness

N = 128


def probes():
  x = jnp.asarray(np.random.default_rng(0).standard_normal(N), jnp.float32)
  i = jnp.asarray(np.random.default_rng(1).integers(0, N, N), jnp.int32)

  def add_k(x_ref, o_ref):  # the control: an element-wise kernel.
    o_ref[...] = x_ref[...] + 1.0

  def sort_k(x_ref, o_ref):
    o_ref[...] = jnp.sort(x_ref[...])

  def cumsum_k(x_ref, o_ref):
    o_ref[...] = jnp.cumsum(x_ref[...])

  def gather_k(x_ref, i_ref, o_ref):
    o_ref[...] = jnp.take(x_ref[...], i_ref[...])

  def scatter_k(x_ref, i_ref, o_ref):
    o_ref[...] = jnp.zeros((N,), jnp.float32).at[i_ref[...]].add(x_ref[...])

  def histogram_k(i_ref, o_ref):
    o_ref[...] = jnp.zeros((N,), jnp.int32).at[i_ref[...]].add(1)

  def ref_scatter_k(x_ref, i_ref, o_ref):
    o_ref[...] = jnp.zeros((N,), jnp.float32)
    o_ref[i_ref[...]] = x_ref[...]

  xn, inn = np.asarray(x), np.asarray(i)
  sc = np.zeros(N, np.float32)
  np.add.at(sc, inn, xn)
  last = np.zeros(N, np.float32)
  last[inn] = xn
  return [
      ("element-wise add (control)", add_k, (x,), jnp.float32, xn + 1),
      ("sort", sort_k, (x,), jnp.float32, np.sort(xn)),
      ("cumsum", cumsum_k, (x,), jnp.float32, np.cumsum(xn)),
      ("gather from registers", gather_k, (x, i), jnp.float32, xn[inn]),
      ("scatter-add into registers", scatter_k, (x, i), jnp.float32, sc),
      ("histogram", histogram_k, (i,), jnp.int32,
       np.bincount(inn, minlength=N)),
      ("scatter into a ref", ref_scatter_k, (x, i), jnp.float32, None),
  ]


def mosaic_gpu_kernel(body, out_shape, params):
  """``body`` as a Mosaic GPU kernel with one output: ``plgpu.kernel``
  where JAX has it, else ``pl.pallas_call`` with Mosaic GPU's params."""
  if hasattr(plgpu, "kernel"):
    return plgpu.kernel(body, out_type=out_shape, compiler_params=params)
  return pl.pallas_call(body, out_shape=out_shape, compiler_params=params)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  rows = []
  on_gpu = jax.default_backend() == "gpu"
  for semantics in ("Lane", "Warpgroup"):
    params = plgpu.CompilerParams(
        lowering_semantics=getattr(plgpu.LoweringSemantics, semantics))
    for name, body, operands, dtype, want in probes():
      call = mosaic_gpu_kernel(body, jax.ShapeDtypeStruct((N,), dtype),
                               params)
      try:
        # Lowering for "cuda" runs Mosaic GPU's lowering on any host.
        jax.jit(call).trace(*operands).lower(lowering_platforms=("cuda",))
        outcome = "lowers"
        if on_gpu:
          out = np.asarray(jax.block_until_ready(call(*operands)))
          outcome += ", ran" + ("" if want is None else (
              ", correct" if np.allclose(out, want, rtol=1e-5)
              else ", WRONG"))
      except Exception as e:  # pylint: disable=broad-except
        lines = str(e).strip().splitlines() or [repr(e)]
        outcome = f"{type(e).__name__}: {lines[0][:200]}"
      rows.append({"semantics": semantics, "op": name, "outcome": outcome})
      print(f"| {semantics} | {name} | {outcome} |", flush=True)
  result = {"jax": jax.__version__, "device": str(jax.devices()[0]),
            "rows": rows}
  return harness.write_json(result, args.json, indent=1)


if __name__ == "__main__":
  main()
