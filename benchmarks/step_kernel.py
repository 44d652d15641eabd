"""MicroAdam's fused per-leaf GPU kernel: checked against the XLA reference, timed.

Checks (fresh random state, awkward sizes, a tie-heavy case, a leaf of more
than 2**31 entries whose last blocks are checked against the reference run on
those blocks alone) that the kernel of :mod:`pallas_kernels.gpu.step`
computes what :func:`pallas_kernels.dispatch.leaf_step_reference` computes:
the same codes (up to a few codes flipped by one-ulp differences of the
dequantized error), min/max within 1e-6, the same window row (as a set per
block), ``u`` within bf16 rounding; with the parameter's update fused into
the second kernel, the new bf16 parameter within one bf16 step of the
reference's. Then times the kernels on one 4096 x 11008 tensor (Llama-2-7B's
MLP), writing ``u`` or updating the parameter, with device-side timing
(median of ``--iters`` calls over rotating inputs), against a device copy of
the same tensor's bytes, and reports their share of the copy bandwidth.

  python3 benchmarks/step_kernel.py --json step_kernel.json          # GPU
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:  # run as a script: benchmarks/ is on sys.path
  import harness  # pylint: disable=g-import-not-at-top  # puts the checkout on sys.path
except ImportError:  # imported as benchmarks.step_kernel (the GPU tests)
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
from microadam_optax._layout import leaf_layout
from pallas_kernels import dispatch
from pallas_kernels import quantize as quant_lib
from pallas_kernels import window as window_lib

B1, B2, EPS = 0.9, 0.999, 1e-8


def random_state(rng, lay, window: int, *, vdtype=jnp.bfloat16, zero=False):
  """A random (or all-zero) MicroAdam state of one leaf with layout ``lay``."""
  nb, k = lay.num_topk_blocks, lay.k
  if zero:
    codes = np.zeros((nb, lay.code_bytes), np.uint8)
    lo = hi = np.zeros(nb, np.float32)
  else:
    codes = rng.integers(0, 256, (nb, lay.code_bytes), dtype=np.uint8)
    lo = -np.abs(rng.standard_normal(nb)).astype(np.float32)
    hi = np.abs(rng.standard_normal(nb)).astype(np.float32)
  idx = rng.integers(0, lay.topk_block, (window, nb, k))
  idx[:, -1, :] %= lay.last_topk_length
  val = rng.standard_normal((window, nb, k)).astype(np.float32)
  if zero:
    idx[:] = 0
    val[:] = 0
  return (jnp.asarray(idx, lay.index_dtype), jnp.asarray(val, vdtype),
          jnp.asarray(codes), jnp.asarray(lo), jnp.asarray(hi))


def bf16_step(*values) -> np.ndarray:
  """One step of bf16 (8 significant bits) at the largest magnitude of
  ``values``, entry by entry."""
  mag = np.max([np.abs(np.asarray(v, np.float32)) for v in values], axis=0)
  return 2.0 ** (np.floor(np.log2(np.maximum(mag, 1e-30))) - 7)


def draw_case(seed: int, d: int, block: int, density: float, window: int, *,
              zero=False, grad_zero=False) -> tuple:
  """A case's ``(layout, state, gradient, parameter)``, drawn from ``seed``
  in that order (bf16 gradient and parameter; a zero gradient with
  ``grad_zero``, an all-zero state with ``zero``)."""
  rng = np.random.default_rng(seed)
  lay = leaf_layout(d, topk_block_size=block, quant_block_size=block,
                    density=density, error_bits=4)
  state = random_state(rng, lay, window, zero=zero)
  g = np.zeros(d, np.float32) if grad_zero else rng.standard_normal(d)
  p = rng.standard_normal(d)
  return lay, state, jnp.asarray(g, jnp.bfloat16), jnp.asarray(p, jnp.bfloat16)

def compare(out, ref, lay, value_steps: int = 0) -> dict:
  """Differences between the kernel's outputs and the reference's.

  ``value_steps``: how many steps of the values' dtype (bf16) a window
  value may be off the reference's (0: equal). Triton's interpreter
  truncates float32 to bf16 where the GPU rounds to nearest, so its values
  are compared within one step.
  """
  u, iw, vw, codes, lo, hi = (np.asarray(x.astype(jnp.float32))
                              if x.dtype == jnp.bfloat16 else np.asarray(x)
                              for x in out)
  ru, riw, rvw, rcodes, rlo, rhi = (np.asarray(x.astype(jnp.float32))
                                    if x.dtype == jnp.bfloat16
                                    else np.asarray(x) for x in ref)
  if value_steps:
    # Each row's entries in index order (a row's indices are distinct but
    # for the last block's empty (0, 0) slots, which sort alike).
    o, ro = np.argsort(iw, -1, kind="stable"), np.argsort(riw, -1,
                                                          kind="stable")
    v, rv = np.take_along_axis(vw, o, -1), np.take_along_axis(rvw, ro, -1)
    rows_equal = bool(
        np.array_equal(np.take_along_axis(iw, o, -1),
                       np.take_along_axis(riw, ro, -1))
        and np.all(np.abs(v - rv) <= value_steps * bf16_step(rv)))
  else:
    rows_equal = all(
        sorted(zip(iw[r, b].tolist(), vw[r, b].tolist()))
        == sorted(zip(riw[r, b].tolist(), rvw[r, b].tolist()))
        for r in range(iw.shape[0]) for b in range(iw.shape[1]))
  span = np.maximum(np.abs(rhi - rlo), 1e-30)
  unpack = lambda c: np.stack([c & 15, c >> 4], -1).astype(np.int32)
  level_diff = np.abs(unpack(codes) - unpack(rcodes))
  rel_u = float(np.linalg.norm(u - ru) / max(np.linalg.norm(ru), 1e-30))
  res = {
      "codes_differing": int((level_diff > 0).sum()),
      "codes_max_level_diff": int(level_diff.max()),
      "codes_total": int(level_diff.size),
      "minmax_rel": float(max(np.max(np.abs(lo - rlo) / span),
                              np.max(np.abs(hi - rhi) / span))),
      "window_equal": bool(rows_equal),
      "u_rel_err": rel_u,
      "u_nan": int(np.isnan(u).sum() - np.isnan(ru).sum()),
  }
  res["ok"] = bool(res["window_equal"] and res["minmax_rel"] < 1e-5
                   and res["codes_max_level_diff"] <= 1
                   and res["codes_differing"] <= max(4, level_diff.size // 100)
                   and rel_u < 1e-2 and res["u_nan"] == 0)
  return res


def step_fns(lay, out_dtype=jnp.bfloat16, num_warps=None):
  kw = dict(layout=lay, b1=B1, b2=B2, eps=EPS, bits=4, out_dtype=out_dtype)
  kernel = jax.jit(lambda *a: dispatch.leaf_step(
      *a, implementation="auto",
      config=dispatch.KernelConfig(gpu_num_warps=num_warps), **kw))
  reference = jax.jit(lambda *a: dispatch.leaf_step_reference(*a, **kw))
  return kernel, reference


def check_case(seed: int, d: int, block: int, density: float, window: int,
               count: int, *, zero=False, grad_zero=False, run=None,
               value_steps: int = 0) -> dict:
  """The Top-K and ``u`` kernels against the reference (:func:`compare`).

  ``run(layout, state, grad, count)`` runs the kernels and returns ``(u,
  *new state)``; by default the optimizer's GPU path (jax-triton).
  ``value_steps``: as in :func:`compare`.
  """
  lay, state, g, _ = draw_case(seed, d, block, density, window, zero=zero,
                               grad_zero=grad_zero)
  kernel, reference = step_fns(lay)
  ref = reference(g, *state, jnp.int32(count))
  if run is None:
    out = kernel(g, *[jnp.array(x) for x in state], jnp.int32(count))
  else:
    out = run(lay, state, g, count)
  res = compare(out, ref, lay, value_steps)
  res.update(d=d, block=block, density=density, window=window, count=count,
             zero_state=zero, zero_grad=grad_zero)
  return res


def check_apply_case(seed: int, d: int, block: int, density: float,
                     window: int, count: int, *, weight_decay: float,
                     learning_rate: float = 0.5, run=None, cast=None,
                     value_steps: int = 0) -> dict:
  """The kernels with the parameter's update fused (``param=``) against
  :func:`pallas_kernels.dispatch.apply_update` of the reference ``u`` of the
  kernel's own new window: the new bf16 parameter within one bf16 step of
  the larger of the old and new magnitudes, and 99 % of it equal to the
  new value cast to bf16; the state as in :func:`check_case`.

  ``run(layout, state, grad, count, *, param, lr, wd)`` runs the kernels and
  returns ``(new parameter, *new state)``; by default the optimizer's GPU
  path. ``cast``: how the kernels round the float32 parameter to bf16 (a
  function of float32 NumPy arrays; by default to nearest, as XLA and the
  GPU do). ``value_steps``: as in :func:`compare`. Also reported:
  ``param_changed`` and ``param_moved_off_window`` (entries that moved where
  ``u`` is 0: none without weight decay).
  """
  lay, state, g, p = draw_case(seed, d, block, density, window)
  if run is None:
    kw = dict(layout=lay, b1=B1, b2=B2, eps=EPS, bits=4,
              out_dtype=jnp.bfloat16)
    fused = jax.jit(lambda g, p, *s: dispatch.leaf_step(
        g, *s, jnp.int32(count), implementation="auto", param=p,
        learning_rate=learning_rate, weight_decay=weight_decay, **kw))
    new_p, *new_state = fused(g, p, *[jnp.array(x) for x in state])
  else:
    new_p, *new_state = run(lay, state, g, count, param=p, lr=learning_rate,
                            wd=weight_decay)
  _, reference = step_fns(lay)
  ref = reference(g, *state, jnp.int32(count))
  u = window_lib.window_update_reference(
      new_state[0], new_state[1], jnp.int32(count), block_size=block, b1=B1,
      b2=B2, eps=EPS).reshape(-1)[:d]
  exact = np.asarray(dispatch.apply_update(p.astype(jnp.float32), u,
                                           learning_rate, weight_decay),
                     np.float32)
  rounded = np.asarray(jnp.asarray(exact).astype(jnp.bfloat16), np.float32)
  want = rounded if cast is None else cast(exact)
  got = np.asarray(new_p, np.float32)
  old = np.asarray(p, np.float32)
  res = compare((u.astype(jnp.bfloat16), *new_state), ref, lay, value_steps)
  res.update(d=d, block=block, weight_decay=weight_decay,
             param_max_steps=float(np.max(np.abs(got - rounded)
                                          / bf16_step(rounded, old))),
             param_equal_fraction=float(np.mean(got == want)),
             param_changed=int(np.sum(got != old)),
             param_moved_off_window=int(np.sum((got != old)
                                               & (np.asarray(u) == 0))),
             param_dtype=str(new_p.dtype))
  res["ok"] = bool(res["ok"] and res["param_max_steps"] <= 1.0
                   and res["param_equal_fraction"] >= 0.99
                   and new_p.dtype == jnp.bfloat16)
  return res


def check_huge(seed: int, window: int = 2, d: int = 2**31 + 3 * 4096 + 1000
               ) -> dict:
  """A leaf of more than 2**31 entries: its last blocks against the reference."""
  block, density = 4096, 0.01
  rng = np.random.default_rng(seed)
  lay = leaf_layout(d, topk_block_size=block, quant_block_size=block,
                    density=density, error_bits=4)
  tail_blocks = 4
  start = (lay.num_topk_blocks - tail_blocks) * block
  tail = leaf_layout(d - start, topk_block_size=block,
                     quant_block_size=block, density=density, error_bits=4)
  g_tail = jnp.asarray(rng.standard_normal(d - start), jnp.bfloat16)
  t_state = random_state(rng, tail, window)
  nb = lay.num_topk_blocks
  # Built and sliced under jit: indices past 2**31 are static there (eager
  # indexing would pass them as int32 arguments).
  tb = tail_blocks

  @jax.jit
  def build(g_tail, iw_t, vw_t, codes_t, lo_t, hi_t):
    def tail(length, t, axis=0):
      shape = list(t.shape)
      shape[axis] = length - t.shape[axis]
      return jnp.concatenate([jnp.zeros(shape, t.dtype), t], axis=axis)
    return (tail(d, g_tail), tail(nb, iw_t, 1), tail(nb, vw_t, 1),
            tail(nb, codes_t), tail(nb, lo_t), tail(nb, hi_t))

  kernel, _ = step_fns(lay)

  @jax.jit
  def run_tail(*args):
    u, iw, vw, codes, lo, hi = kernel(*args, jnp.int32(3))
    last = lambda x, axis=0: jax.lax.slice_in_dim(
        x, x.shape[axis] - tb, x.shape[axis], axis=axis)
    return (jax.lax.slice_in_dim(u, start, d), last(iw, 1), last(vw, 1),
            last(codes), last(lo), last(hi))

  out = run_tail(*build(g_tail, *t_state))
  _, reference = step_fns(tail)
  ref = reference(g_tail, *t_state, jnp.int32(3))
  res = compare(out, ref, tail)
  res.update(d=d, block=block, density=density, window=window, count=3,
             huge=True)
  return res


def time_kernel(rows: int, cols: int, *, window: int = 10, sets: int = 3,
                iters: int = 30, num_warps=None,
                weight_decay: float | None = None) -> dict:
  """Median time of the kernels on one ``rows x cols`` bf16 leaf: the step
  writing ``u`` or, given ``weight_decay``, the step with the parameter's
  update fused (``param=``, updated in place)."""
  d = rows * cols
  lay = leaf_layout(d, topk_block_size=4096, quant_block_size=4096,
                    density=0.01, error_bits=4)
  rng = np.random.default_rng(0)
  if weight_decay is None:
    kernel, _ = step_fns(lay, num_warps=num_warps)
    out = jnp.zeros((d,), jnp.bfloat16)  # u, not read
  else:
    kernel = lambda g, p, *s: dispatch.leaf_step(
        g, *s, layout=lay, b1=B1, b2=B2, eps=EPS, bits=4,
        out_dtype=jnp.bfloat16, implementation="auto",
        config=dispatch.KernelConfig(gpu_num_warps=num_warps), param=p,
        learning_rate=1e-4, weight_decay=weight_decay)
    out = jnp.asarray(rng.standard_normal(d), jnp.bfloat16)  # the param
  fused = weight_decay is not None
  # (grad, out, *state, count) -> (out, *state); out donated too.
  call = jax.jit(lambda g, o, *a: kernel(g, o, *a) if fused else kernel(
      g, *a), donate_argnums=(1, 2, 3, 4, 5, 6) if fused else (2, 3, 4, 5, 6))
  grads = [jnp.asarray(rng.standard_normal(d), jnp.bfloat16)
           for _ in range(sets)]
  state = random_state(rng, lay, window)
  for i in range(3):
    out, *state = call(grads[i % sets], out, *state, jnp.int32(11 + i))
  jax.block_until_ready(state)
  # Each timing: 10 calls back to back (each depends on the last one's
  # state, so they run in order; the host dispatches ahead), one sync.
  times = []
  for i in range(iters):
    t0 = time.perf_counter()
    for j in range(10):
      out, *state = call(grads[(i + j) % sets], out, *state,
                         jnp.int32(20 + j))
    jax.block_until_ready((out, state))
    times.append((time.perf_counter() - t0) / 10)
  # Bytes it must move: gradient, codes in and out, min/max, the window's
  # other rows in, one row out; u out, or the parameter in and out (with
  # weight decay; without, only at the window's entries: not counted).
  entry = jnp.dtype(lay.index_dtype).itemsize + 2
  last = {None: d * 2, 0.0: 0}.get(weight_decay, d * 4)
  nbytes = (d * 2 + 2 * lay.num_topk_blocks * lay.code_bytes
            + 4 * 4 * lay.num_topk_blocks
            + window * lay.num_topk_blocks * lay.k * entry + last)
  t = statistics.median(times)
  return {"shape": [rows, cols], "num_warps": num_warps,
          "weight_decay": weight_decay, "median_s": t,
          "min_s": min(times), "bytes": nbytes, "GB_per_s": nbytes / t / 1e9}


CASES = [
    (0, 4096 * 3, 4096, 0.01, 10, 13),
    (1, 1000, 250, 0.05, 4, 2),
    (2, 2 * 4096 + 1000, 4096, 0.01, 3, 1),
    (3, 64, 8, 0.3, 1, 5),
    (4, 5 * 8192 + 6, 8192, 0.02, 10, 25),
    (5, 3 * 32768, 32768, 0.01, 2, 4),
    (6, 301, 100, 0.01, 1, 3),  # one entry per block in the window
]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--iters", type=int, default=30)
  parser.add_argument("--no-huge", action="store_true")
  parser.add_argument("--no-checks", action="store_true",
                      help="only time (the checks are tests/test_gpu_kernels.py)")
  parser.add_argument("--warps", default="4",
                      help="warps of the Top-K kernel, comma list")
  parser.add_argument("--apply", default="none,0,1e-4",
                      help="comma list of the second kernel's variants: "
                      "none (u written) or a weight decay (the parameter "
                      "updated in place)")
  args = parser.parse_args(argv)
  result = {"device": str(jax.devices()[0]), "jax": jax.__version__,
            "checks": [], "timings": []}
  checks = [functools.partial(check_case, *case) for case in CASES] + [
      functools.partial(check_case, 6, 3 * 4096, 4096, 0.01, 4, 1, zero=True,
                        grad_zero=True),
      functools.partial(check_case, 7, 3 * 4096, 4096, 0.01, 4, 2,
                        zero=True)] + [
      functools.partial(check_apply_case, *case, weight_decay=wd)
      for case in CASES for wd in (0.0, 0.1)]
  if not args.no_huge:
    checks.append(functools.partial(check_huge, 8))
  if args.no_checks:
    checks = []
  for check in checks:
    result["checks"].append(check())
    print(result["checks"][-1], flush=True)
  bw = harness.copy_bandwidth(1 << 30)
  result["copy_GB_per_s"] = bw / 1e9
  for w in [int(x) for x in args.warps.split(",")]:
    for a in args.apply.split(","):
      wd = None if a == "none" else float(a)
      r = time_kernel(4096, 11008, iters=args.iters, num_warps=w,
                      weight_decay=wd)
      r["copy_fraction"] = r["GB_per_s"] * 1e9 / bw
      result["timings"].append(r)
      print(f"warps {w}, apply {a}: {r['median_s'] * 1e3:.3f} ms", flush=True)
  harness.write_json(result, args.json, indent=1)
  print(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s")
  print("| check | d | block | ok | codes differing | u rel err |")
  for c in result["checks"]:
    if "param_max_steps" in c:
      print(f"| apply wd {c['weight_decay']:g} | {c['d']} | {c['block']} | "
            f"{c['ok']} | param max {c['param_max_steps']:.1f} bf16 steps, "
            f"{100 * c['param_equal_fraction']:.2f} % equal | "
            f"{c['u_rel_err']:.2e} |")
      continue
    print(f"| {'huge' if c.get('huge') else 'case'} | {c['d']} | {c['block']} "
          f"| {c['ok']} | {c['codes_differing']}/{c['codes_total']} "
          f"| {c['u_rel_err']:.2e} |")
  print("| kernels, 4096x11008 | warps | median ms | GB/s | % of copy |")
  for r in result["timings"]:
    what = ("step, u written" if r["weight_decay"] is None else
            f"step, parameter updated (wd {r['weight_decay']:g})")
    print(f"| {what} | {r['num_warps']} | {r['median_s'] * 1e3:.3f} | "
          f"{r['GB_per_s']:.0f} | {100 * r['copy_fraction']:.1f} % |")
  return result


if __name__ == "__main__":
  res = main()
  sys.exit(0 if all(c["ok"] for c in res["checks"]) else 1)
