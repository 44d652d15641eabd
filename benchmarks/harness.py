"""What the benchmark scripts share: the checkout on ``sys.path``, the
device's memory counters and the JSON file a result is written to.

Each script runs as ``python benchmarks/NAME.py``; Python then puts
``benchmarks/`` on ``sys.path``, so ``import harness`` finds this module, and
importing it puts the repository root there too, so that ``microadam_optax``
and ``microadam_compare`` import from a checkout that was not installed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Optional

#: The repository root (the folder above ``benchmarks/``).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def memory_stats() -> dict[str, Any]:
  """The first device's ``memory_stats()``; ``{}`` where the back end has
  none (CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.devices()[0].memory_stats() or {}


def copy_bandwidth(nbytes: int, iters: int = 20) -> float:
  """The first device's copy bandwidth: bytes read plus written per second.

  The median of ``iters`` synchronised runs of ``x + 1`` over a float32
  buffer of ``nbytes`` bytes (after one compiling run).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda a: a + 1.0)
  jax.block_until_ready(f(x))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t0)
  return 2 * x.nbytes / statistics.median(times)


def write_json(result: Any, path: Optional[str], indent: int = 2) -> Any:
  """Writes ``result`` as JSON to ``path`` (nothing when ``path`` is empty)
  and returns it: the tail of every script's ``main``."""
  if path:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=indent)
  return result
