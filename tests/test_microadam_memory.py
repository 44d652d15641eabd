"""MicroAdam's XLA path on large leaves: bounded temporaries, same results.

Where no kernel runs (CPU, layouts without kernels) a leaf of more than
``KernelConfig.xla_chunk_elements`` entries is updated in groups of whole
blocks (:func:`pallas_kernels.dispatch.leaf_step_chunked`), every output in
place. The compiled step's temporaries (``compiled.memory_analysis()``) on a
stacked ``[L, 64, 256]`` bf16 leaf, L growing: in one piece they grow by ~17
bytes per added entry; in groups, 16-bit arrays updated in place (what runs
on GPU and TPU), they stay a few groups' worth whatever L, with or without
donation; on CPU by default 16-bit arrays go through the loop as integers
(XLA:CPU would make each group's update a pass over the whole leaf), which
costs one copy of them: ~2.2 bytes per entry. The results must be those of
the one-piece update, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import microadam_optax as mo
from pallas_kernels import dispatch

BLOCK = 256
CHUNK = 8 * BLOCK  # entries per group
IN_PLACE = dispatch.KernelConfig(xla_chunk_elements=CHUNK,
                                 xla_16bit_in_place=True)
CPU_DEFAULT = dispatch.KernelConfig(xla_chunk_elements=CHUNK)
WHOLE = dispatch.KernelConfig(xla_chunk_elements=1 << 30)


def _temp_bytes(layers: int, config, donate: bool = False) -> int:
  params = {"layers": {"w": jnp.zeros((layers, 64, 256), jnp.bfloat16)}}
  tx = mo.scale_by_microadam(topk_block_size=BLOCK, implementation="xla",
                             kernel_config=config)
  state = jax.eval_shape(tx.init, params)
  step = jax.jit(tx.update, donate_argnums=(0, 1) if donate else ())
  compiled = step.lower(params, state).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("donate", [False, True])
def test_temporaries_in_groups_do_not_grow_with_the_leaf(donate):
  temps = [_temp_bytes(layers, IN_PLACE, donate) for layers in (4, 16, 64)]
  # A few group-sized buffers (~25 bytes per entry of a group), no
  # leaf-sized one: a bf16 copy of the smallest leaf (4 x 64 x 256 entries,
  # 128 KiB) is already twice the bound.
  assert max(temps) <= 32 * CHUNK, temps


def test_temporaries_in_one_piece_and_on_cpu_by_default():
  added = (64 - 4) * 64 * 256  # entries added to the leaf
  whole = [_temp_bytes(layers, WHOLE) for layers in (4, 64)]
  cpu = [_temp_bytes(layers, CPU_DEFAULT) for layers in (4, 64)]
  # Bytes of temporaries per added entry: ~17 in one piece; ~2.2 in groups
  # with 16-bit arrays as integers (one copy of the bf16 update and window
  # values).
  assert (whole[1] - whole[0]) / added > 10, whole
  assert (cpu[1] - cpu[0]) / added < 2.5, cpu


@pytest.mark.parametrize("shape, dtype, alpha", [
    ((7, 256 * 3 + 5), jnp.bfloat16, 0.0),  # ragged last block, 2 groups
    ((3, 1100), jnp.bfloat16, 0.0),  # one whole group and the tail
    ((4, 64, 256), jnp.bfloat16, 0.0),  # whole groups only
    ((7, 256 * 3 + 5), jnp.float32, 0.0),
    ((7, 256 * 3 + 5), jnp.bfloat16, 0.5),  # u in float32 (densified)
])
def test_groups_give_the_one_piece_results(shape, dtype, alpha):
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal(shape), dtype)}
  configs = {"in_place": IN_PLACE, "cpu_default": CPU_DEFAULT, "whole": WHOLE}
  txs = {c: mo.scale_by_microadam(topk_block_size=BLOCK, density=0.05,
                                  window=3, alpha=alpha, implementation="xla",
                                  kernel_config=cfg)
         for c, cfg in configs.items()}
  states = {c: tx.init(params) for c, tx in txs.items()}
  # The grouped steps donate their gradients and state, as a training step.
  steps = {c: jax.jit(tx.update, donate_argnums=() if c == "whole" else (0, 1))
           for c, tx in txs.items()}
  for _ in range(4):
    grads = rng.standard_normal(shape)
    out = {}
    for c in txs:
      out[c], states[c] = steps[c]({"w": jnp.asarray(grads, dtype)},
                                   states[c])
    expected = jax.tree.leaves((out["whole"], states["whole"]))
    for c in ("in_place", "cpu_default"):
      for a, b in zip(jax.tree.leaves((out[c], states[c])), expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=c)


def test_kernel_config_is_checked():
  with pytest.raises(ValueError, match="kernel_config"):
    mo.scale_by_microadam(kernel_config={"gpu_num_warps": 8})
  with pytest.raises(ValueError, match="xla_chunk_elements"):
    dispatch.KernelConfig(xla_chunk_elements=0)
  with pytest.raises(ValueError, match="xla_16bit_in_place"):
    dispatch.KernelConfig(xla_16bit_in_place=1)
