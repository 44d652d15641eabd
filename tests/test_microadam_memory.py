"""MicroAdam's XLA path on large leaves: smaller temporaries, same results.

Where no kernel runs (CPU, layouts without kernels) a leaf of more than
``KernelConfig.xla_chunk_elements`` entries is updated in groups of whole
blocks (:func:`pallas_kernels.dispatch.leaf_step_chunked`). The compiled
step's temporaries (``compiled.memory_analysis()``) on a stacked ``[L, d, d]``
leaf, L growing: the one-piece update's grow by ~17 bytes per added entry;
in groups by ~2-4 (copies XLA:CPU makes of the loop's leaf-sized operands,
the gradient and the update: what is left to remove). The results must be
those of the one-piece update, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import microadam_optax as mo
from pallas_kernels import dispatch

BLOCK = 256
CHUNKED = dispatch.KernelConfig(xla_chunk_elements=8 * BLOCK)
WHOLE = dispatch.KernelConfig(xla_chunk_elements=1 << 30)


def _temp_bytes(layers: int, config) -> int:
  params = {"layers": {"w": jnp.zeros((layers, 64, 256), jnp.bfloat16)}}
  tx = mo.scale_by_microadam(topk_block_size=BLOCK, implementation="xla",
                             kernel_config=config)
  state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(tx.update).lower(params, state).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_temporaries_grow_less_in_groups():
  small, large = _temp_bytes(4, CHUNKED), _temp_bytes(32, CHUNKED)
  whole_small, whole_large = _temp_bytes(4, WHOLE), _temp_bytes(32, WHOLE)
  added = (32 - 4) * 64 * 256  # entries added to the leaf
  # Bytes of temporaries per added entry: ~17 in one piece, ~2 in groups
  # (a copy of the gradient into the loop's state).
  assert (whole_large - whole_small) / added > 10
  assert (large - small) / added < 5, (small, large)
  assert large < whole_large / 3


@pytest.mark.parametrize("shape", [(7, 256 * 3 + 5), (4, 64, 256)])
def test_groups_give_the_one_piece_results(shape):
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)}
  txs = {c: mo.scale_by_microadam(topk_block_size=BLOCK, density=0.05,
                                  window=3, implementation="xla",
                                  kernel_config=cfg)
         for c, cfg in (("chunked", CHUNKED), ("whole", WHOLE))}
  states = {c: tx.init(params) for c, tx in txs.items()}
  steps = {c: jax.jit(tx.update) for c, tx in txs.items()}
  for _ in range(4):
    grads = {"w": jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)}
    out = {}
    for c in txs:
      out[c], states[c] = steps[c](grads, states[c])
    for a, b in zip(jax.tree.leaves((out["chunked"], states["chunked"])),
                    jax.tree.leaves((out["whole"], states["whole"]))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kernel_config_is_checked():
  with pytest.raises(ValueError, match="kernel_config"):
    mo.scale_by_microadam(kernel_config={"gpu_num_warps": 8})
  with pytest.raises(ValueError, match="xla_chunk_elements"):
    dispatch.KernelConfig(xla_chunk_elements=0)
