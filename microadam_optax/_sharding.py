"""What a parameter's sharding tells an optimizer that works per shard.

MicroAdam cuts each flattened parameter into blocks. On a mesh it runs on each
device's local shard (how: :mod:`microadam_optax._per_shard`), so this module
answers one question in one place: given a leaf, which mesh axes split it,
into how many shards, and what shape each shard has.

Where the sharding is known:

* a concrete ``jax.Array`` carries it (``x.sharding``), eagerly, whatever the
  mesh's axis types;
* inside ``jit``, a value on a mesh with *Explicit* axes carries it in its
  type (``jax.typeof(x).sharding``);
* inside ``jit`` on a mesh with *Auto* axes the type says nothing: the
  compiler decides, and code that must act per shard defers to it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional, Union

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax.sharding import AxisType


def is_traced(x: Any) -> bool:
  """Whether ``x`` is a tracer (inside ``jit``, ``grad``, ...).

  Public APIs only: a concrete :class:`jax.Array` knows whether it is
  committed to a device; a tracer raises
  :class:`jax.errors.ConcretizationTypeError` when asked.
  """
  if not isinstance(x, jax.Array):
    return False
  try:
    x.committed  # pylint: disable=pointless-statement
  except jax.errors.ConcretizationTypeError:
    return True
  return False


def _has_explicit_axes(mesh: Any) -> bool:
  types = getattr(mesh, "axis_types", ()) or ()
  return any(t == AxisType.Explicit for t in types)


def known_sharding(x: Any) -> Optional[NamedSharding]:
  """The :class:`NamedSharding` of ``x`` when it is known while tracing.

  Args:
    x: an array or a tracer.

  Returns:
    ``x.sharding`` for a concrete array placed with a ``NamedSharding``; the
    sharding in the type of a tracer on a mesh with Explicit axes; ``None``
    otherwise (one device, or a tracer on a mesh with Auto axes, whose
    sharding only the compiler knows).
  """
  if is_traced(x):
    try:
      sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
      return None
    if (isinstance(sharding, NamedSharding) and not sharding.mesh.empty
        and _has_explicit_axes(sharding.mesh)):
      return sharding
    return None
  sharding = getattr(x, "sharding", None)
  return sharding if isinstance(sharding, NamedSharding) else None


def entry_axes(entry: Any) -> Optional[tuple[str, ...]]:
  """Names in one entry of a PartitionSpec; ``None``: not names.

  An entry is ``None`` (no names), a name, or a tuple or list of names: mesh
  axes in a sharding's spec, logical axis names in a parameter's.
  ``P.UNCONSTRAINED`` and anything else give ``None``.
  """
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  if isinstance(entry, (tuple, list)) and all(isinstance(a, str)
                                              for a in entry):
    return tuple(entry)
  return None  # P.UNCONSTRAINED and the like


@dataclasses.dataclass(frozen=True)
class ShardGrid:
  """How a sharding cuts one array.

  Attributes:
    mesh: the sharding's mesh (concrete or abstract).
    axes: the mesh axes that split the array, dimension by dimension, in the
      order of its PartitionSpec; a shard's index in row-major order over
      them is its position in the array's grid of shards.
    num_shards: the number of distinct shards, the product of those axes'
      sizes (devices on other axes hold replicas).
    local_shape: the shape of each shard.
    even: whether every split dimension divides evenly.
  """
  mesh: Any
  axes: tuple[str, ...]
  num_shards: int
  local_shape: tuple[int, ...]
  even: bool

  @property
  def axes_entry(self) -> Any:
    """The axes as one PartitionSpec entry (``None`` when unsplit)."""
    if not self.axes:
      return None
    return self.axes[0] if len(self.axes) == 1 else self.axes


def shard_grid(sharding: NamedSharding, shape: tuple[int, ...]
               ) -> Optional[ShardGrid]:
  """The :class:`ShardGrid` of an array of ``shape`` under ``sharding``.

  Returns ``None`` when the spec holds entries other than mesh-axis names
  (for example ``PartitionSpec.UNCONSTRAINED``).
  """
  spec = tuple(sharding.spec)
  spec = spec + (None,) * (len(shape) - len(spec))
  axes: list[str] = []
  local = []
  even = True
  for size, entry in zip(shape, spec):
    names = entry_axes(entry)
    if names is None:
      return None
    parts = math.prod(sharding.mesh.shape[a] for a in names)
    axes.extend(names)
    even = even and size % parts == 0
    local.append(-(-size // parts))
  return ShardGrid(mesh=sharding.mesh, axes=tuple(axes),
                   num_shards=math.prod(sharding.mesh.shape[a] for a in axes),
                   local_shape=tuple(local), even=even)


def place(x: jax.Array, mesh: Any, spec: P) -> jax.Array:
  """``x`` with sharding ``NamedSharding(mesh, spec)``, eagerly or traced.

  A concrete array is put there (``jax.device_put``); a traced value on a
  mesh with Explicit axes gets it in its type (``jax.sharding.reshard``).
  """
  target = NamedSharding(mesh, spec)
  if is_traced(x):
    return jax.sharding.reshard(x, target)
  return jax.device_put(x, target)


def with_explicit_sharding(x: jax.Array,
                           sharding: Optional[NamedSharding]) -> jax.Array:
  """``x`` resharded to ``sharding`` where sharding is in the types.

  Returns ``x`` unchanged when ``sharding`` is ``None``, its mesh has no
  Explicit axes, or ``x`` is concrete (the compiler or the runtime places
  it).
  """
  if (sharding is None or not _has_explicit_axes(sharding.mesh)
      or not is_traced(x)):
    return x
  return jax.sharding.reshard(x, sharding.spec)


def keep_sharding(x: jax.Array, like: Any) -> jax.Array:
  """``x`` resharded like ``like`` where sharding is in the types.

  On a mesh with Explicit axes an elementwise update of a state leaf takes
  the sharding of its operands (a gradient split like its parameter); this
  keeps the leaf's own, so a state's shardings do not change from step to
  step. Elsewhere ``x`` is returned as it is (the compiler places it).
  """
  return with_explicit_sharding(x, known_sharding(like))


def zeros(shape: tuple[int, ...], dtype: Any, like: Any, mesh: Any,
          spec: P) -> jax.Array:
  """Zeros created directly in their shards, sharded by ``(mesh, spec)``.

  ``like`` is the parameter the zeros belong to: when it is concrete, each
  device allocates only its own shard.
  """
  if is_traced(like):
    return place(jax.numpy.zeros(shape, dtype), mesh, spec)
  return jax.numpy.zeros(shape, dtype, device=NamedSharding(mesh, spec))


def _param_sharding(path: Any, leaf: Any) -> NamedSharding:
  sharding = getattr(leaf, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    raise ValueError(
        f"state_shardings needs every parameter placed with a NamedSharding "
        f"(a jax.Array on a mesh, or a jax.ShapeDtypeStruct with "
        f"sharding=NamedSharding(...)); the leaf at "
        f"{jax.tree_util.keystr(path) or '<root>'} has sharding "
        f"{sharding!r}.")
  return sharding


def state_shardings(tx: Any, params: Any) -> Any:
  """The shardings of ``tx.init(params)``'s state, from the params' own.

  What ``jax.jit(tx.init, out_shardings=...)`` and a checkpoint restore into
  a mesh need. The state is traced abstractly (nothing is allocated) with the
  parameters' shardings in their types, on a twin of their mesh whose axes
  are Explicit, so every transformation places its state as its own ``init``
  would on that mesh: Optax's moments like their parameter, MicroAdam's
  window and error blocks split over the axes that split their parameter
  (see :func:`microadam_optax.scale_by_microadam`), counters and scalars
  replicated. Works for any transformation and chain.

  Inside ``jit`` on a mesh with Auto axes, ``tx.init`` cannot see the
  parameters' shardings (only the compiler knows them), and XLA places a
  state it creates from nothing wherever it likes (usually replicated, for
  Optax's own optimizers too): pass these shardings as ``out_shardings``.
  Eager ``tx.init(params)``, and ``jit`` on meshes with Explicit axes, place
  the state correctly by themselves.

  Args:
    tx: an Optax gradient transformation.
    params: the parameters: ``jax.Array`` leaves placed with a
      :class:`jax.sharding.NamedSharding`, or ``jax.ShapeDtypeStruct`` leaves
      carrying one (``jax.eval_shape`` of a model's init with its
      shardings), all on one mesh.

  Returns:
    A pytree like ``tx.init(params)`` whose leaves are ``NamedSharding`` on
    the parameters' mesh.

  Raises:
    ValueError: if a leaf has no ``NamedSharding`` or the leaves use several
      meshes.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import microadam_optax as mo
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    >>> params = {"w": jax.device_put(jnp.ones((8, 4096)),
    ...                               NamedSharding(mesh, P("fsdp", None)))}
    >>> tx = mo.microadam(1e-3)
    >>> shardings = mo.state_shardings(tx, params)
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
    >>> state[0].error_codes["w"].sharding.spec == P("fsdp", None)
    True
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  shardings = [_param_sharding(path, leaf) for path, leaf in leaves]
  meshes = {s.mesh for s in shardings}
  if len(meshes) > 1:
    raise ValueError(
        f"state_shardings needs all parameters on one mesh; got "
        f"{len(meshes)}: {sorted(map(str, meshes))}.")
  if not shardings:
    return jax.tree.map(lambda _: None, jax.eval_shape(tx.init, params))
  mesh = shardings[0].mesh
  twin = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                           axis_types=(AxisType.Explicit,) * len(
                               mesh.axis_names))
  abstract = treedef.unflatten([
      jax.ShapeDtypeStruct(jax.numpy.shape(leaf), jax.numpy.result_type(leaf),
                           sharding=NamedSharding(twin, s.spec))
      for (_, leaf), s in zip(leaves, shardings)])
  with jax.set_mesh(twin):
    out = jax.eval_shape(tx.init, abstract)

  def to_mesh(x):
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    return NamedSharding(mesh, P() if spec is None else spec)

  return jax.tree.map(to_mesh, out)


#: The kinds of collective :func:`collectives` looks for in compiled HLO.
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")
_DIMS = re.compile(r"\[([0-9,]*)\]")


def collectives(compiled: Union[str, Any]) -> dict[str, int]:
  """The collectives a compiled computation holds, with the largest array
  each kind produces.

  How to check that a sharded training or optimizer step communicates what
  it should: an FSDP step whose optimizer gathers a parameter shows an
  ``all-gather`` as large as that parameter. Reads the HLO text of the
  compiled program (synchronous ops and the ``-start`` halves of
  asynchronous ones); the size of a tuple-shaped result is its largest
  member's.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``)
      or its ``as_text()``.

  Returns:
    ``{kind: elements}`` for each kind of :data:`COLLECTIVES` present, where
    ``elements`` counts the entries of the largest array an op of that kind
    produces; empty when the program does not communicate.

  Example:
    >>> import microadam_optax as mo
    >>> mo.collectives("%ag = f32[8,4096]{1,0} all-gather(f32[1,4096]{1,0} "
    ...                "%p), dimensions={0}")
    {'all-gather': 32768}
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  found: dict[str, int] = {}
  for line in text.splitlines():
    if "=" not in line:
      continue
    for kind in COLLECTIVES:
      if f" {kind}(" not in line and f" {kind}-start(" not in line:
        continue
      result = line.split("=", 1)[1].split(kind, 1)[0]
      sizes = [math.prod(int(d) for d in dims.split(",") if d)
               for dims in _DIMS.findall(result)] or [1]
      found[kind] = max(found.get(kind, 0), max(sizes))
  return found
