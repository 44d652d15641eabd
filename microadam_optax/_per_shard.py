"""Runs a per-leaf function on each device's shard of the leaf.

An optimizer that works per block of a flattened parameter (MicroAdam) can
update each shard of a sharded parameter by itself when the shards hold whole
blocks: its state is then split like the parameter and no device sees
another's shard. This module is how, whatever the mesh's axis types:

* where the sharding is known while tracing (concrete arrays; Explicit mesh
  axes, :func:`microadam_optax._sharding.known_sharding`) the per-shard update
  is a ``jax.shard_map``;
* where only the compiler knows it (``jit`` on a mesh with Auto axes) it is a
  ``custom_partitioning`` op, whose partitioning callback sees the leaf's
  sharding and makes the same choice.

Both run the caller's unmodified per-leaf function, Pallas kernels included,
on local arrays: XLA never sees a pallas_call it would have to replicate.
What is the optimizer's own -- which shard grids it can update alone, its
state's PartitionSpecs, the warning when a leaf must be gathered -- comes in
as arguments.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from microadam_optax import _sharding


def local_ok(grid: Optional[_sharding.ShardGrid],
             shard_ok: Callable[[_sharding.ShardGrid], bool]) -> bool:
  """Whether each shard of ``grid`` can be updated alone.

  ``shard_ok`` is the caller's test of an even grid of several shards.
  """
  if grid is None or not grid.even:
    return False
  if grid.num_shards == 1:
    return True
  return shard_ok(grid)


class Plan(NamedTuple):
  """How one leaf is updated: ``mode`` and, for a known sharding, its grid.

  Modes: ``"global"`` (no mesh: the caller's function runs on the whole
  leaf), ``"local"`` (per shard, ``shard_map``; on a replicated leaf each
  device updates its replica), ``"gather"`` (sharded, but its shards cannot
  be updated alone: gathered, state replicated), ``"deferred"`` (traced on a
  mesh with Auto axes: decided by ``custom_partitioning`` when compiling).
  """
  mode: str
  sharding: Optional[NamedSharding] = None
  grid: Optional[_sharding.ShardGrid] = None


def plan(x: Any, shard_ok: Callable[[_sharding.ShardGrid], bool]) -> Plan:
  """The :class:`Plan` of leaf ``x``; ``shard_ok`` as in :func:`local_ok`."""
  sharding = _sharding.known_sharding(x)
  if sharding is None:
    deferred = _sharding.is_traced(x) and jnp.ndim(x) > 0
    return Plan("deferred" if deferred else "global")
  grid = _sharding.shard_grid(sharding, tuple(jnp.shape(x)))
  if local_ok(grid, shard_ok):
    return Plan("local", sharding, grid)
  return Plan("gather", sharding, grid)


def split_traced(hp: Any, names: tuple[str, ...]
                 ) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
  """Moves the traced fields ``names`` of NamedTuple ``hp`` into one array.

  Python numbers (and ``None``) stay static (a per-leaf function may branch
  on them while tracing); the others (``optax.inject_hyperparams``) travel as a float32
  vector, an operand of the per-shard function, which unpacks it with the
  returned ``rebuild``.
  """
  names = [n for n in names if getattr(hp, n) is not None
           and not isinstance(getattr(hp, n), (int, float))]
  values = [jnp.asarray(getattr(hp, n), jnp.float32) for n in names]
  dyn = jnp.stack(values) if values else jnp.zeros((1,), jnp.float32)

  def rebuild(dyn: jax.Array) -> Any:
    return hp._replace(**{n: dyn[i] for i, n in enumerate(names)})

  return dyn, rebuild


def run(fn: Callable[..., tuple], plan: Plan, x: jax.Array, state: tuple,
        operands: tuple, *, shard_ok: Callable[[_sharding.ShardGrid], bool],
        state_specs: Callable[[Any], tuple[P, ...]],
        state_factors: tuple[str, ...],
        on_gather: Callable[[tuple[int, ...], Any], None],
        partners: tuple = ()):
  """``fn(x, *partners, *state, *operands) -> (y, *new_state)`` on ``x``'s
  shards.

  Args:
    fn: the per-leaf function, run on local arrays: the shard of ``x``, the
      same shard of each partner, the matching shards of the state, the
      whole operands. ``y`` is shaped like its ``x``, each new state array
      like its old one.
    plan: ``plan(x, shard_ok)``, of mode ``"local"``, ``"gather"`` or
      ``"deferred"`` (for ``"global"`` the caller runs ``fn`` itself).
    x: the leaf.
    state: the leaf's state arrays, shaped by ``x``'s global shape alone;
      split by ``state_specs(grid.axes_entry)`` where the shards are updated
      alone, replicated otherwise.
    operands: arrays of rank >= 1 given whole to every shard.
    shard_ok: see :func:`local_ok`.
    state_specs: from a PartitionSpec entry (mesh axes, or ``None``) to the
      PartitionSpecs of the state arrays split over it.
    state_factors: the state arrays' dimensions as the factors of a
      ``custom_partitioning`` sharding rule (``"w n k"``; names neither
      ``d<i>`` nor ``r<i>_<j>``, which name ``x``'s and the operands').
    on_gather: called with ``x``'s shape and spec when ``x`` is gathered.
    partners: arrays shaped like ``x``, split like it (resharded to ``x``'s
      sharding where theirs differs), as a gradient's parameter.

  Returns:
    ``(y, *new_state)``, ``y`` sharded like ``x``, the state like ``state``.

  Example:
    A per-shard function whose state is one sum per shard:

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> from microadam_optax import _per_shard
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    >>> x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("x")))
    >>> sums = jax.device_put(jnp.zeros(1), NamedSharding(mesh, P("x")))
    >>> def fn(x, sums, scale):  # on local arrays
    ...   return scale * x, sums + jnp.sum(x)
    >>> def whole_pairs(grid):  # shards of whole pairs of entries
    ...   return grid.local_shape[0] % 2 == 0
    >>> plan = _per_shard.plan(x, whole_pairs)
    >>> y, sums = _per_shard.run(
    ...     fn, plan, x, (sums,), (jnp.full((1,), 2.0),),
    ...     shard_ok=whole_pairs, state_specs=lambda entry: (P(entry),),
    ...     state_factors=("s",), on_gather=print)
    >>> plan.mode, float(y[3]), float(sums[0])
    ('local', 6.0, 28.0)
  """
  for a in partners:
    if tuple(jnp.shape(a)) != tuple(jnp.shape(x)):
      raise ValueError(
          f"partners must be shaped like x {tuple(jnp.shape(x))}, got "
          f"{tuple(jnp.shape(a))}.")
  if plan.mode == "deferred":
    return _deferred(fn, x, state, operands, shard_ok=shard_ok,
                     state_specs=state_specs, state_factors=state_factors,
                     on_gather=on_gather, partners=partners)
  if plan.mode not in ("local", "gather"):
    raise ValueError(
        f"plan.mode must be 'local', 'gather' or 'deferred', got "
        f"{plan.mode!r}.")
  mesh = plan.sharding.mesh
  rep = (P(),) * len(operands)
  num_x = 1 + len(partners)

  def on_mesh(xspec, entry, *args):
    specs = state_specs(entry)
    return jax.shard_map(fn, mesh=mesh,
                         in_specs=((xspec,) * num_x + (*specs, *rep)),
                         out_specs=(xspec, *specs), check_vma=False)(*args)

  if plan.mode == "local":
    return on_mesh(plan.sharding.spec, plan.grid.axes_entry, x, *partners,
                   *state, *operands)
  # "gather": the whole leaf on every device, then the update re-sharded.
  on_gather(x.shape, plan.sharding.spec)
  out = on_mesh(P(), None, *(_sharding.place(a, mesh, P())
                             for a in (x, *partners, *state)), *operands)
  return (_sharding.place(out[0], mesh, plan.sharding.spec), *out[1:])


def _deferred(fn: Callable[..., tuple], x: jax.Array, state: tuple,
              operands: tuple, *,
              shard_ok: Callable[[_sharding.ShardGrid], bool],
              state_specs: Callable[[Any], tuple[P, ...]],
              state_factors: tuple[str, ...],
              on_gather: Callable[[tuple[int, ...], Any], None],
              partners: tuple = ()):
  """:func:`run` as a ``custom_partitioning`` op (Auto axes).

  Under ``jit`` on a mesh with Auto axes the leaf's sharding is chosen by
  the compiler, after tracing. The op's partitioning callback receives it
  and returns the per-shard function (state split like the leaf) when each
  shard can be updated alone, else the function of the gathered leaf. On
  one device the op is inlined.
  """
  shape = x.shape
  num_x = 1 + len(partners)
  num_state, num_args = len(state), num_x + len(state) + len(operands)

  @custom_partitioning
  def op(*args):
    return fn(*args)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    sharding = arg_shapes[0].sharding
    grid = (_sharding.shard_grid(sharding, shape)
            if isinstance(sharding, NamedSharding) else None)
    rep = NamedSharding(mesh, P())
    if local_ok(grid, shard_ok):
      xsh = NamedSharding(mesh, sharding.spec)
      specs = [NamedSharding(mesh, s) for s in state_specs(grid.axes_entry)]
      return (mesh, fn, (xsh, *specs),
              ((xsh,) * num_x + (*specs, *(rep,) * len(operands))))
    on_gather(shape, getattr(sharding, "spec", sharding))
    return mesh, fn, (rep,) * (1 + num_state), (rep,) * num_args

  def infer(mesh, args, result_shape):
    del mesh, result_shape
    return (args[0].sharding,) + tuple(a.sharding for a in args[num_x:][
        :num_state])

  dims = " ".join(f"d{i}" for i in range(len(shape)))
  rest = [" ".join(f"r{i}_{j}" for j in range(jnp.ndim(a)))
          for i, a in enumerate(operands)]
  results = ", ".join((dims, *state_factors))
  rule = (f"{', '.join((dims,) * num_x + (*state_factors, *rest))} -> "
          f"{results}")
  op.def_partition(partition=partition, sharding_rule=rule,
                   infer_sharding_from_operands=infer)
  return op(x, *partners, *state, *operands)
