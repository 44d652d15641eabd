"""Operations that XLA's SPMD partitioner cannot split by itself.

``jax.lax.top_k`` over the last axis is independent across the leading axis,
but XLA all-gathers a row-sharded operand before it. :func:`row_top_k` tells
the partitioner (through ``custom_partitioning``) that each device may take
the Top-K of its own rows, so a MicroAdam update on FSDP-sharded parameters
moves no parameter between devices.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _row_spec(sharding, ndim: int) -> P:
  spec = tuple(getattr(sharding, "spec", ())) + (None,) * ndim
  return P(*spec[:ndim - 1], None)


@functools.partial(custom_partitioning, static_argnums=(1,))
def _row_top_k(x: jax.Array, k: int):
  return jax.lax.top_k(x, k)


def _infer(k, mesh, arg_shapes, result_shape):
  del k, result_shape
  spec = _row_spec(arg_shapes[0].sharding, len(arg_shapes[0].shape))
  out = NamedSharding(mesh, spec)
  return [out, out]


def _partition(k, mesh, arg_shapes, result_shape):
  del result_shape
  spec = _row_spec(arg_shapes[0].sharding, len(arg_shapes[0].shape))
  sharding = NamedSharding(mesh, spec)

  def lower(x):
    return jax.lax.top_k(x, k)

  return mesh, lower, [sharding, sharding], (sharding,)


_row_top_k.def_partition(
    partition=_partition,
    infer_sharding_from_operands=_infer,
    sharding_rule="b n -> b k, b k",
    need_replication_factors=("n", "k"),
)


def row_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``jax.lax.top_k(x, k)`` for a 2-D ``x``, partitioned along rows."""
  if x.ndim != 2:
    raise ValueError(f"row_top_k takes a 2-D array, got shape {x.shape}.")
  return _row_top_k(x, k)
