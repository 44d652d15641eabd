"""Checks and times MicroAdam's Pallas kernels against their XLA references.

On a GPU: every kernel is checked against its reference on fresh random
inputs of awkward sizes (compiled, not interpreted), then timed on one
Llama-2-7B-sized tensor (default ``4096 x 11008``, bf16) with its achieved
bandwidth (bytes it must move / time) against a measured device-to-device
copy. On a CPU it runs the same code at a tiny size (interpret mode).

  python benchmarks/kernels.py --check --json kernels.json
  python benchmarks/kernels.py --rows 64 --cols 512     # small, for CPUs
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import error_feedback as ef_lib
from pallas_kernels import quantize as quant_lib
from pallas_kernels import topk as topk_lib
from pallas_kernels import window as window_lib


def timed(fn: Callable[..., Any], args: tuple, *, steps: int = 10,
          warmup: int = 2, feedback: Callable[[Any, tuple], tuple] | None = None
          ) -> tuple[float, list[float]]:
  """Median wall time (ms) of ``fn(*args)`` after warm-up, synchronised.

  ``feedback(out, args)`` gives the next call's arguments (for functions
  that donate and return their state).
  """
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append((time.perf_counter() - t0) * 1e3)
    if feedback is not None:
      args = feedback(out, args)
  return statistics.median(times), times


def copy_bandwidth(nbytes: int) -> float:
  """Device-to-device copy bandwidth (bytes read + written per second)."""
  n = nbytes // 4
  x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
  neg = jax.jit(lambda v: -v)
  ms, _ = timed(neg, (x,), steps=10)
  del x
  return 2 * n * 4 / (ms * 1e-3)


def _layout(d: int, block: int, density: float, window: int):
  nb = -(-d // block)
  k = max(1, int(np.ceil(round(block * density, 9))))
  last_len = d - (nb - 1) * block
  last_k = max(1, min(last_len, int(np.ceil(round(last_len * density, 9)))))
  return nb, k, last_len, last_k, window


def _random_state(key, d: int, block: int, density: float, window: int):
  nb, k, _, last_k, m = _layout(d, block, density, window)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  g = (jax.random.normal(k1, (d,), jnp.float32) * 1e-3).astype(jnp.bfloat16)
  err = jax.random.normal(k2, (nb, block), jnp.float32) * 1e-4
  codes, lo, hi = quant_lib.quantize_reference(err)
  # Distinct positions per row, as Top-K writes them.
  idx = jnp.argsort(jax.random.uniform(k3, (m, nb, block)), axis=-1)[..., :k]
  idx = idx.astype(jnp.int16 if block <= 32768 else jnp.int32)
  if last_k < k:
    keep = jnp.arange(k) < last_k
    idx = idx.at[:, -1, :].set(jnp.where(keep, idx[:, -1, :] % max(
        1, d - (nb - 1) * block), 0))
  val = (jax.random.normal(k4, (m, nb, k), jnp.float32) * 1e-3).astype(
      jnp.bfloat16)
  return g, codes, lo, hi, idx, val


def _sets_equal(a, b) -> bool:
  return bool(np.array_equal(np.sort(np.asarray(a), -1),
                             np.sort(np.asarray(b), -1)))


def check_all(seed: int = 0) -> list[dict]:
  """Each kernel against its reference on awkward sizes; returns the rows."""
  rows = []
  rng = np.random.default_rng(seed)
  for d, block, density in [(4096 * 3, 4096, 0.01), (1001, 256, 0.05),
                            (7, 4, 0.3), (2 * 4096 + 1000, 4096, 0.01)]:
    try:
      _check_case(rows, rng, d, block, density)
    except Exception as e:  # pylint: disable=broad-except
      rows.append({"kernel": "case", "d": d, "block": block, "ok": False,
                   "error": f"{type(e).__name__}: {e}"[:3000]})
  try:
    rows.extend(check_optimizer(seed))
  except Exception as e:  # pylint: disable=broad-except
    rows.append({"kernel": "optimizer", "ok": False,
                 "error": f"{type(e).__name__}: {e}"[:3000]})
  return rows


def check_optimizer(seed: int, steps: int = 5) -> list[dict]:
  """``scale_by_microadam`` with "pallas" vs "xla" over several steps."""
  import microadam_optax as mo  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  shapes = {"a": (512, 96), "b": (4096 * 2 + 300,), "c": (33, 7)}
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for k, s in shapes.items()}
  txs = {i: mo.scale_by_microadam(window=4, values_dtype=jnp.float32,
                                  implementation=i, density=0.02)
         for i in ("xla", "pallas")}
  states = {i: t.init(params) for i, t in txs.items()}
  ups = {i: jax.jit(t.update) for i, t in txs.items()}
  rows = []
  for step in range(steps):
    grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
             for k, s in shapes.items()}
    outs = {}
    for i in txs:
      outs[i], states[i] = ups[i](grads, states[i])
    for k in shapes:
      same = np.mean(np.sort(np.asarray(states["xla"].window_indices[k]), -1)
                     == np.sort(np.asarray(
                         states["pallas"].window_indices[k]), -1))
      ref = np.asarray(outs["xla"][k])
      err = float(np.max(np.abs(np.asarray(outs["pallas"][k]) - ref))
                  / (np.max(np.abs(ref)) + 1e-30))
      codes = float(np.mean(np.asarray(states["xla"].error_codes[k])
                            == np.asarray(states["pallas"].error_codes[k])))
      rows.append({"kernel": "optimizer pallas vs xla", "leaf": k,
                   "step": step + 1, "ok": same > 0.999 and err < 1e-3,
                   "same_indices_fraction": float(same), "rel_err": err,
                   "codes_equal_fraction": codes})
  return rows


def _check_case(rows: list, rng, d: int, block: int, density: float) -> None:
  """Checks every kernel on one size (appends rows)."""
  key = jax.random.key(int(rng.integers(1 << 30)))
  g, codes, lo, hi, idx, val = _random_state(key, d, block, density, 3)
  nb, k, last_len, last_k, _ = _layout(d, block, density, 3)
  # Top-K on a float32 block matrix (tie-free: continuous values).
  x = jax.random.normal(key, (nb, block), jnp.float32)
  ti, tv = topk_lib.block_topk_pallas(x, k, last_block_length=last_len,
                                      last_block_k=last_k)
  ri, rv = topk_lib.block_topk_reference(x, k, last_block_length=last_len,
                                         last_block_k=last_k)
  rows.append({"kernel": "topk", "d": d, "block": block,
               "ok": _sets_equal(ti, ri) and _sets_equal(tv, rv)})
  # Fused error feedback (aligned blocks, even block size).
  if block % 2 == 0:
    kw = dict(block_size=block, k=k, last_block_k=last_k,
              index_dtype=jnp.int16, values_dtype=jnp.bfloat16)
    out_p = jax.jit(lambda *a: ef_lib.error_feedback_pallas(*a, **kw))(
        g, codes, lo, hi)
    out_r = jax.jit(lambda *a: ef_lib.error_feedback_reference(*a, **kw))(
        g, codes, lo, hi)
    same_codes = float(np.mean(np.asarray(out_p[2]) == np.asarray(
        out_r[2])))
    rows.append({
        "kernel": "error_feedback", "d": d, "block": block,
        "ok": _sets_equal(out_p[0], out_r[0]) and same_codes > 0.999
              and bool(np.allclose(out_p[3], out_r[3], rtol=1e-6))
              and bool(np.allclose(out_p[4], out_r[4], rtol=1e-6)),
        "codes_equal_fraction": same_codes})
    # Quantize / dequantize.
    xq = jax.random.normal(key, (nb, block), jnp.float32)
    qp = quant_lib.quantize_pallas(xq, 4, last_len)
    qr = quant_lib.quantize_reference(xq, 4, last_len)
    dp = quant_lib.dequantize_pallas(*qr, 4, block)
    dr = quant_lib.dequantize_reference(*qr, 4, block)
    rows.append({
        "kernel": "quantize+dequantize", "d": d, "block": block,
        "ok": float(np.mean(np.asarray(qp[0]) == np.asarray(qr[0])))
              > 0.999 and bool(np.allclose(dp, dr, rtol=1e-5, atol=1e-6)),
    })
  # Window -> u and the fused parameter update.
  for t in (1, 5):
    ur = window_lib.window_update_reference(idx, val, t, block_size=block)
    for variant in window_lib.WINDOW_VARIANTS:
      up = window_lib.window_update_pallas(idx, val, t, block_size=block,
                                           variant=variant, programs=3)
      err = float(jnp.max(jnp.abs(up - ur)) / (jnp.max(jnp.abs(ur)) + 1e-30))
      rows.append({"kernel": f"window[{variant}]", "d": d, "block": block,
                   "t": t, "ok": err < 1e-5, "rel_err": err})
      p = jax.random.normal(key, (d,), jnp.float32)
      for wd in (0.0, 0.1):
        pp = window_lib.window_param_update_pallas(
            p, idx, val, t, block_size=block, learning_rate=1e-2,
            weight_decay=wd, variant=variant, programs=3)
        pr = window_lib.window_param_update_reference(
            p, idx, val, t, block_size=block, learning_rate=1e-2,
            weight_decay=wd)
        err = float(jnp.max(jnp.abs(pp - pr)))
        rows.append({"kernel": f"window_param[{variant}] wd={wd}", "d": d,
                     "block": block, "t": t, "ok": err < 1e-5,
                     "abs_err": err})
  return rows


def time_kernels(rows_: int, cols: int, *, block: int = 4096,
                 density: float = 0.01, window: int = 10, steps: int = 10,
                 copy_bw: float) -> list[dict]:
  """Times every kernel (and its reference) on one ``rows_ x cols`` tensor.

  ``bytes`` is what the kernel must move through device memory (each input
  read once, each output written once).
  """
  d = rows_ * cols
  nb, k, _, last_k, m = _layout(d, block, density, window)
  g, codes, lo, hi, idx, val = _random_state(jax.random.key(1), d, block,
                                             density, window)
  out = []

  def run(name, fn, args, nbytes, *, n=steps, feedback=None, note=""):
    try:
      ms, times = timed(fn, args, steps=n, feedback=feedback)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {name:<48} FAILED {type(e).__name__}: {str(e)[:1500]}",
            flush=True)
      out.append({"kernel": name, "error": f"{type(e).__name__}: {e}"[:3000]})
      return
    bw = nbytes / (ms * 1e-3)
    out.append({"kernel": name, "ms": ms, "times_ms": times, "bytes": nbytes,
                "GB_per_s": bw / 1e9, "fraction_of_copy": bw / copy_bw,
                "note": note})
    print(f"  {name:<48} {ms:9.3f} ms {nbytes / 1e9:7.3f} GB "
          f"{bw / 1e9:8.1f} GB/s {100 * bw / copy_bw:5.1f} % {note}",
          flush=True)

  win_bytes = m * nb * k * (idx.dtype.itemsize + val.dtype.itemsize)
  row_bytes = nb * k * (idx.dtype.itemsize + val.dtype.itemsize)
  ef_bytes = d * 2 + 2 * (d // 2) + 4 * nb * 4 + row_bytes
  kw = dict(block_size=block, k=k, last_block_k=last_k,
            index_dtype=idx.dtype, values_dtype=val.dtype)

  # A fresh gradient each call (three cycled): one gradient reused makes the
  # error pile up on the same entries, an unrealistic Top-K input.
  grads = [g] + [(jax.random.normal(jax.random.key(10 + i), (d,), jnp.float32)
                  * 1e-3).astype(jnp.bfloat16) for i in range(2)]
  turn = [0]

  def ef_feedback(o, a):
    turn[0] += 1
    return (grads[turn[0] % 3], o[2], o[3], o[4])

  for warps, pack in ((None, None), (None, False), (4, None), (16, None)):
    f = jax.jit(lambda *a, warps=warps, pack=pack: ef_lib.error_feedback_pallas(
        *a, num_warps=warps, pack=pack, **kw), donate_argnums=(1, 2, 3))
    run(f"error_feedback pallas (warps={warps or 'default'}, "
        f"pack={'default' if pack is None else pack})", f,
        (g, codes.copy(), lo.copy(), hi.copy()), ef_bytes,
        feedback=ef_feedback)
  f = jax.jit(lambda *a: ef_lib.error_feedback_reference(*a, **kw),
              donate_argnums=(1, 2, 3))
  run("error_feedback xla reference", f,
      (g, codes.copy(), lo.copy(), hi.copy()), ef_bytes, n=3,
      feedback=ef_feedback)

  x = g.astype(jnp.float32).reshape(nb, block)
  tk_bytes = d * 4 + row_bytes
  run("topk pallas (float32 in)",
      jax.jit(lambda v: topk_lib.block_topk_pallas(v, k)), (x,), tk_bytes)
  run("topk xla (lax.top_k)",
      jax.jit(lambda v: topk_lib.block_topk_reference(v, k)), (x,), tk_bytes,
      n=3)
  q_bytes = d * 4 + d // 2 + 8 * nb
  run("quantize pallas", jax.jit(quant_lib.quantize_pallas), (x,), q_bytes)
  run("quantize xla", jax.jit(quant_lib.quantize_reference), (x,), q_bytes)
  run("dequantize pallas", jax.jit(
      lambda c, a, b: quant_lib.dequantize_pallas(c, a, b)), (codes, lo, hi),
      q_bytes)
  run("dequantize xla", jax.jit(
      lambda c, a, b: quant_lib.dequantize_reference(c, a, b)),
      (codes, lo, hi), q_bytes)
  del x

  u_bytes = win_bytes + 2 * d
  count = jnp.int32(37)
  for variant in window_lib.WINDOW_VARIANTS:
    for programs in (None, 1056):
      f = jax.jit(lambda i, v, variant=variant, programs=programs:
                  window_lib.window_update_pallas(
                      i, v, count, block_size=block, out_dtype=jnp.bfloat16,
                      variant=variant, programs=programs))
      run(f"window->u pallas [{variant}, programs={programs or 'default'}]",
          f, (idx, val), u_bytes)
  f = jax.jit(lambda i, v: window_lib.window_update_reference(
      i, v, count, block_size=block).astype(jnp.bfloat16))
  run("window->u xla reference", f, (idx, val), u_bytes, n=3)

  p = (jax.random.normal(jax.random.key(3), (d,), jnp.float32)).astype(
      jnp.bfloat16)
  for variant in window_lib.WINDOW_VARIANTS:
    for wd in (0.0, 0.1):
      f = jax.jit(lambda pp, i, v, variant=variant, wd=wd:
                  window_lib.window_param_update_pallas(
                      pp, i, v, count, block_size=block, learning_rate=1e-4,
                      weight_decay=wd, variant=variant), donate_argnums=(0,))
      nbytes = win_bytes + (4 * d if wd else 2 * 2 * m * nb * k)
      run(f"window->param pallas [{variant}, wd={wd}]", f,
          (p.copy(), idx, val), nbytes,
          feedback=lambda o, a: (o, a[1], a[2]),
          note="wd=0: only the window's positions" if not wd else "")
  return out


def sweep(rows_: int, cols: int, *, block: int = 4096, density: float = 0.01,
          window: int = 10, steps: int = 10, copy_bw: float) -> list[dict]:
  """Tuning sweep: blocks and warps per program, persistent programs."""
  d = rows_ * cols
  nb, k, _, last_k, m = _layout(d, block, density, window)
  g, codes, lo, hi, idx, val = _random_state(jax.random.key(1), d, block,
                                             density, window)
  out = []
  ef_bytes = d * 2 + 2 * (d // 2) + 4 * nb * 4 + nb * k * 4
  u_bytes = m * nb * k * 4 + 2 * d
  kw = dict(block_size=block, k=k, last_block_k=last_k,
            index_dtype=idx.dtype, values_dtype=val.dtype)
  count = jnp.int32(37)

  def config_run(name, config, fn, args, nbytes, feedback=None):
    try:
      ms, _ = timed(jax.jit(fn, donate_argnums=(1, 2, 3) if feedback else ()),
                    args, steps=steps, feedback=feedback)
      bw = nbytes / (ms * 1e-3)
      row = {"kernel": name, **config, "ms": ms, "GB_per_s": bw / 1e9,
             "fraction_of_copy": bw / copy_bw}
      print(f"  {name:<22} {config} {ms:8.3f} ms {100 * bw / copy_bw:5.1f} %",
            flush=True)
    except Exception as e:  # pylint: disable=broad-except
      row = {"kernel": name, **config,
             "error": f"{type(e).__name__}: {e}"[:2000]}
      print(f"  {name:<22} {config} FAILED {str(e)[:500]}", flush=True)
    out.append(row)

  grads = [g] + [(jax.random.normal(jax.random.key(10 + i), (d,), jnp.float32)
                  * 1e-3).astype(jnp.bfloat16) for i in range(2)]
  turn = [0]

  def ef_feedback(o, a):
    turn[0] += 1
    return (grads[turn[0] % 3], o[2], o[3], o[4])

  for rows in (1, 2):
    for warps in (4, 8, 16):
      config_run("error_feedback", {"rows": rows, "num_warps": warps},
                 lambda *a, rows=rows, warps=warps:
                 ef_lib.error_feedback_pallas(*a, rows=rows, num_warps=warps,
                                              **kw),
                 (g, codes.copy(), lo.copy(), hi.copy()), ef_bytes,
                 feedback=ef_feedback)
  for rows in (1, 2):
    for warps in (4, 8, 16):
      for programs in (528, 1056):
        config_run("window[elect]", {"rows": rows, "num_warps": warps,
                                     "programs": programs},
                   lambda i, v, rows=rows, warps=warps, programs=programs:
                   window_lib.window_update_pallas(
                       i, v, count, block_size=block, out_dtype=jnp.bfloat16,
                       variant="elect", rows=rows, num_warps=warps,
                       programs=programs), (idx, val), u_bytes)
  return out


def device_sweep(rows_: int, cols: int, *, block: int = 4096,
                 density: float = 0.01, window: int = 10, calls: int = 10,
                 copy_bw: float) -> list[dict]:
  """Kernel configurations timed on the device (CUPTI events of a trace).

  Host-side timings of one kernel call carry the dispatch (~0.1-0.3 ms,
  varying between runs); the trace gives the kernel's own duration: the
  median over ``calls`` calls of each configuration.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  import step_profile  # pylint: disable=g-import-not-at-top
  d = rows_ * cols
  nb, k, _, last_k, m = _layout(d, block, density, window)
  g, codes, lo, hi, idx, val = _random_state(jax.random.key(1), d, block,
                                             density, window)
  kw = dict(block_size=block, k=k, last_block_k=last_k,
            index_dtype=idx.dtype, values_dtype=val.dtype)
  ef_bytes = d * 2 + 2 * (d // 2) + 4 * nb * 4 + nb * k * 4
  u_bytes = m * nb * k * (idx.dtype.itemsize + val.dtype.itemsize) + 2 * d
  count = jnp.int32(37)
  configs = []
  for warps in (4, 8):
    for pack in (False, True):
      configs.append(("error_feedback", {"num_warps": warps, "pack": pack},
                      lambda *a, w=warps, p=pack: ef_lib.error_feedback_pallas(
                          *a, num_warps=w, pack=p, **kw),
                      (g, codes, lo, hi), ef_bytes))
  for variant, warps, programs in (("elect", 8, 528), ("elect", 16, 528),
                                   ("elect", 16, 1056), ("atomic", 16, 528)):
    configs.append((f"window[{variant}]",
                    {"num_warps": warps, "programs": programs},
                    lambda i, v, w=warps, p=programs, var=variant:
                    window_lib.window_update_pallas(
                        i, v, count, block_size=block,
                        out_dtype=jnp.bfloat16, variant=var,
                        num_warps=w, programs=p), (idx, val), u_bytes))
  # Every configuration's output is checked: the window's against the XLA
  # reference, the error feedback's against the first configuration's.
  u_ref = window_lib.window_update_reference(idx, val, count,
                                             block_size=block)
  u_scale = float(jnp.max(jnp.abs(u_ref)))
  first_ef = []

  def check(name, result):
    if name.startswith("window"):
      err = float(jnp.max(jnp.abs(result.astype(jnp.float32) - u_ref)))
      # u is rounded to bf16: 2^-8 relative.
      return {"rel_err": err / u_scale, "ok": err / u_scale < 1e-2}
    if not first_ef:
      first_ef.append(result)
    same = all(bool(jnp.array_equal(a, b))
               for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(
                   first_ef[0])))
    return {"same_as_first": same, "ok": same}

  out = []
  for name, config, fn, args, nbytes in configs:
    f = jax.jit(fn)
    try:
      checked = check(name, f(*args))
      for _ in range(2):
        jax.block_until_ready(f(*args))
      tmp = tempfile.mkdtemp()
      with jax.profiler.trace(tmp):
        for _ in range(calls):
          jax.block_until_ready(f(*args))
      key = name.split("[")[0]
      times = [us for n, us in step_profile.device_events(tmp) if key in n]
      us = statistics.median(times)
      bw = nbytes / (us * 1e-6)
      row = {"kernel": name, **config, "device_ms": us / 1e3,
             "calls": len(times), "bytes": nbytes, "GB_per_s": bw / 1e9,
             "fraction_of_copy": bw / copy_bw, **checked}
      print(f"  {name:<16} {str(config):<36} {us / 1e3:8.3f} ms (device) "
            f"{bw / 1e9:7.1f} GB/s {100 * bw / copy_bw:5.1f} % of copy "
            f"{'ok' if checked['ok'] else 'WRONG'}", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      row = {"kernel": name, **config,
             "error": f"{type(e).__name__}: {e}"[:2000]}
      print(f"  {name} {config} FAILED {str(e)[:300]}", flush=True)
    out.append(row)
  return out


def best_configs(rows: list[dict]) -> dict[str, dict]:
  """The fastest configuration (explicit kernel arguments) of each kernel."""
  best = {}
  for name in sorted({r["kernel"] for r in rows}):
    ok = [r for r in rows if r["kernel"] == name and "ms" in r]
    if ok:
      fastest = min(ok, key=lambda r: r["ms"])
      best[name] = {k: v for k, v in fastest.items()
                    if k in ("rows", "num_warps", "programs")}
  return best


def profile_once(rows_: int, cols: int) -> None:
  """Runs the two main kernels once each (for a profiler such as ncu)."""
  d = rows_ * cols
  _, k, _, last_k, _ = _layout(d, 4096, 0.01, 10)
  g, codes, lo, hi, idx, val = _random_state(jax.random.key(1), d, 4096,
                                             0.01, 10)
  f = jax.jit(lambda *a: ef_lib.error_feedback_pallas(
      *a, block_size=4096, k=k, last_block_k=last_k, index_dtype=idx.dtype,
      values_dtype=val.dtype))
  jax.block_until_ready(f(g, codes, lo, hi))
  w = jax.jit(lambda i, v: window_lib.window_update_pallas(
      i, v, jnp.int32(37), block_size=4096, out_dtype=jnp.bfloat16))
  jax.block_until_ready(w(idx, val))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=None,
                      help="tensor rows (default 4096; 64 on CPU)")
  parser.add_argument("--cols", type=int, default=None,
                      help="tensor columns (default 11008; 512 on CPU)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--check", action="store_true",
                      help="check every kernel against its reference first")
  parser.add_argument("--no-time", action="store_true")
  parser.add_argument("--sweep", action="store_true",
                      help="tuning sweep instead of the kernel table")
  parser.add_argument("--device-sweep", action="store_true",
                      help="time kernel configurations from a device trace")
  parser.add_argument("--profile-once", action="store_true",
                      help="run the two main kernels once (for ncu) and exit")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  on_cpu = jax.default_backend() == "cpu"
  rows_ = args.rows or (64 if on_cpu else 4096)
  cols = args.cols or (512 if on_cpu else 11008)
  result: dict[str, Any] = {
      "device": str(jax.devices()[0].device_kind), "backend":
      jax.default_backend(), "jax": jax.__version__,
      "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node()}
  if args.profile_once:
    profile_once(rows_, cols)
    return result
  if args.check:
    t0 = time.perf_counter()
    checks = check_all()
    result["checks"] = checks
    bad = [c for c in checks if not c["ok"]]
    print(f"checks: {len(checks) - len(bad)}/{len(checks)} ok "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    for c in bad:
      print("  FAILED", c, flush=True)
  if not args.no_time:
    bw = copy_bandwidth(64 << 20 if on_cpu else 4 << 30)
    result["copy_bandwidth_GB_per_s"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; tensor {rows_} x {cols}",
          flush=True)
    if args.device_sweep:
      result["device_sweep"] = device_sweep(rows_, cols, copy_bw=bw)
    elif args.sweep:
      result["sweep"] = sweep(rows_, cols, steps=args.steps, copy_bw=bw)
      result["best"] = best_configs(result["sweep"])
      print("fastest:", result["best"], flush=True)
    else:
      result["kernels"] = time_kernels(rows_, cols, steps=args.steps,
                                       copy_bw=bw)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
