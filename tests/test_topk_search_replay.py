"""The NumPy replay of the GPU kernel's threshold search finds the exact Top-K.

``experiments/topk_search_replay.py`` counts the passes of the kernel's
search and of candidate variants; its counts mean something only if every
variant selects exactly the ``k`` largest magnitudes (ties by position), as
the kernel must. Checked here against a stable sort, on fresh random blocks
of several distributions, ties and zeros included.
"""

from __future__ import annotations

import numpy as np
import pytest

from experiments import topk_search_replay as replay


def _selected(mag, at_least, tie, need):
  above = mag >= at_least
  tied = np.flatnonzero((mag == tie) & ~above)[:need]
  sel = above.copy()
  sel[tied] = True
  return np.flatnonzero(sel)


def _reference(mag, k):
  # The k largest by magnitude, ties taken by position: a stable sort of
  # -magnitude (int64, so no overflow).
  order = np.argsort(-mag.astype(np.int64), kind="stable")
  return np.sort(order[:k])


def _blocks(rng, n):
  x = rng.standard_normal(n).astype(np.float32)
  yield "gaussian", x
  yield "student_t3", rng.standard_t(3, n).astype(np.float32)
  yield "bf16_ties", (x.view(np.uint32) & 0xFFFF0000).view(np.float32)
  yield "few_levels", rng.integers(-3, 4, n).astype(np.float32)
  z = np.zeros(n, np.float32)
  z[rng.integers(0, n, 5)] = rng.standard_normal(5)
  yield "mostly_zero", z
  yield "all_zero", np.zeros(n, np.float32)


@pytest.mark.parametrize("variant", replay.VARIANTS)
@pytest.mark.parametrize("n,k", [(4096, 41), (1000, 50), (64, 20), (8, 8),
                                 (8, 1)])
def test_every_variant_selects_the_exact_top_k(variant, n, k):
  rng = np.random.default_rng([n, k, len(variant)])
  for name, a in _blocks(rng, n):
    mag = np.minimum(a.view(np.int32) & 0x7FFFFFFF, 0x7FFFFFFE)
    at_least, tie, need, passes = replay.search(mag, k, variant)
    got = _selected(mag, at_least, tie, need)
    np.testing.assert_array_equal(got, _reference(mag, k), err_msg=name)
    assert passes <= 64, (name, passes)


def test_evolved_blocks_are_gradient_plus_error():
  mag, k = replay.evolved_blocks(3, blocks=2, block=256, density=0.05,
                                 window=2, cycle=True)
  assert mag.shape == (2, 256) and mag.dtype == np.int32 and k == 13
  assert (mag >= 0).all() and (mag > 0).any()
