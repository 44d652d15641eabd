"""How many counting passes the GPU kernel's threshold search takes, replayed.

A study, not a benchmark: the GPU Top-K kernel
(``pallas_kernels/gpu/step_kernel.py``) finds each block's k-th largest
``|a|`` by an interpolating count search, one reduction over the block per
pass, and the search is about half of the kernel's time. This replays that
search in NumPy (the same integer and float32 arithmetic, pass for pass) on
blocks as the optimizer meets them: the gradient plus the dequantized error
of a state evolved by the XLA reference step
(:func:`pallas_kernels.dispatch.leaf_step_reference`), with fresh gradients
or three gradients in turn (as ``experiments/step_kernel_variants.py`` times
the kernel). It prints the mean and largest number of passes per block for
the kernel's search and for candidate changes, so that a change's pass count
can be known before device time is spent on it:

* ``tail_snap``: when one entry too many is at or above the bracket's lower
  end (or one too few at or above its upper end), one pass finds that
  entry's magnitude (a min or max reduction) and the next probe is placed
  just past it;
* ``two_probes``: two probes per pass (both counts from one reduction),
  aimed at counts ``k -/+ s (clo - k)``.

Every variant returns the exact threshold (checked against a sort in
``tests/test_topk_search_replay.py``); only the number of passes differs.

  PYTHONPATH=. python experiments/topk_search_replay.py --blocks 64
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from microadam_optax._layout import leaf_layout
from pallas_kernels import dispatch

OCTAVE = 1 << 23  # one octave in float32 bit patterns


def log_count(c) -> int:
  """The float32 bit pattern of ``c + 1/2`` (~ 2^23 log2 count)."""
  return int(np.float32(np.float32(c) + np.float32(0.5)).view(np.int32))


def _interpolate(lo, hi, clo, chi, target) -> int:
  frac = (np.float32(log_count(clo) - log_count(target))
          / np.float32(max(log_count(clo) - log_count(chi), 1)))
  return lo + int(np.float32(hi - lo) * frac)


def search(mag: np.ndarray, k: int, variant: str = "kernel",
           spread: float = 0.25) -> tuple[int, int, int, int]:
  """The threshold of the ``k`` largest ``mag`` (int32 bit patterns of
  ``|a|``) as the kernel's search finds it.

  Returns:
    ``(at_least, tie, need, passes)`` as the kernel's ``_kth_search``
    (select every entry ``>= at_least`` and the first ``need`` equal to
    ``tie``), and the number of passes over the block it took.
  """
  top = min(int(mag.max()), 0x7FFFFFFE)
  lo, clo, hi, chi = 0, mag.size, top + 1, 0
  bisect, down, passes = False, 1, 0
  while hi - lo > 1 and clo != k and k > 0:
    width, gallop = hi - lo, lo == 0
    probes = None
    if variant == "tail_snap" and not gallop and clo - k == 1:
      passes += 1  # a min pass: the smallest magnitude at or above lo
      probes = [int(mag[mag >= lo].min()) + 1]
    elif variant == "tail_snap" and k - chi == 1 and hi <= top:
      passes += 1  # a max pass: the largest magnitude below hi
      probes = [int(mag[mag < hi].max())]
    elif variant == "two_probes" and not gallop:
      probes = [
          _interpolate(lo, hi, clo, chi,
                       max(k - max(1, spread * (clo - k)), chi + 0.5)),
          _interpolate(lo, hi, clo, chi,
                       min(k + max(1, spread * (k - chi)), clo - 0.5))]
    elif variant == "two_probes":
      probes = [max(top - down * OCTAVE, 1), max(top - 2 * down * OCTAVE, 1)]
      down *= 4
    else:
      step_down = max(top - min(down, 255) * OCTAVE, 1)
      guess = _interpolate(lo, hi, clo, chi, k)
      probes = [step_down if gallop
                else (lo + width // 2 if bisect else guess)]
      if gallop:
        down *= 2
    passes += 1
    for probe in sorted({min(max(p, lo + 1), hi - 1) for p in probes}):
      c = int((mag >= probe).sum())
      if c >= k and probe > lo:
        lo, clo = probe, c
      elif c < k and probe < hi:
        hi, chi = probe, c
    bisect = (not gallop) and (not bisect) and hi - lo > width // 2
  found = clo == k
  at_least = lo if found else hi
  need = 0 if (found or k <= 0) else k - chi
  return at_least, lo, need, passes


def evolved_blocks(steps: int, *, blocks: int, block: int, density: float,
                   window: int, cycle: bool, seed: int = 0) -> tuple:
  """``|g + Q^{-1}(e)|`` bit patterns ``(blocks, block)`` at step ``steps``
  of a state evolved by the XLA reference step, and ``k``."""
  d = blocks * block
  lay = leaf_layout(d, topk_block_size=block, quant_block_size=block,
                    density=density, error_bits=4)
  nb, k = lay.num_topk_blocks, lay.k
  state = (jnp.zeros((window, nb, k), lay.index_dtype),
           jnp.zeros((window, nb, k), jnp.bfloat16),
           jnp.zeros((nb, lay.code_bytes), jnp.uint8), jnp.zeros(nb),
           jnp.zeros(nb))
  step = jax.jit(lambda *a: dispatch.leaf_step_reference(
      *a, layout=lay, b1=0.9, b2=0.999, eps=1e-8, bits=4,
      out_dtype=jnp.bfloat16))
  rng = np.random.default_rng(seed)
  turns = [jnp.asarray(rng.standard_normal(d), jnp.bfloat16)
           for _ in range(3)]
  for t in range(1, steps + 1):
    g = (turns[t % 3] if cycle
         else jnp.asarray(rng.standard_normal(d), jnp.bfloat16))
    if t == steps:
      e = dispatch.dequantize_leaf(state[2], state[3], state[4], lay, 4)
      a = np.asarray(g.astype(jnp.float32) + e).reshape(nb, block)
      return np.minimum(a.view(np.int32) & 0x7FFFFFFF, 0x7FFFFFFE), k
    _, *state = step(g, *state, jnp.int32(t))
  raise ValueError(f"steps must be at least 1, got {steps!r}.")


VARIANTS = ("kernel", "tail_snap", "two_probes")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--blocks", type=int, default=64)
  p.add_argument("--block", type=int, default=4096)
  p.add_argument("--density", type=float, default=0.01)
  p.add_argument("--window", type=int, default=10)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  rows = []
  for cycle, steps in ((False, 13), (True, 40)):
    mag, k = evolved_blocks(steps, blocks=args.blocks, block=args.block,
                            density=args.density, window=args.window,
                            cycle=cycle)
    for variant in VARIANTS:
      passes = [search(m, k, variant)[3] for m in mag]
      rows.append(dict(gradients="three in turn" if cycle else "fresh",
                       step=steps, variant=variant,
                       mean_passes=float(np.mean(passes)),
                       max_passes=int(max(passes))))
      print(f"{rows[-1]['gradients']:14s} step {steps:3d} {variant:11s} "
            f"passes: mean {rows[-1]['mean_passes']:.2f}, "
            f"max {rows[-1]['max_passes']}")
  result = dict(blocks=args.blocks, block=args.block, density=args.density,
                window=args.window, rows=rows)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
