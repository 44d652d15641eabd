"""microadam-optax: memory-efficient and second-order optimizers for Optax.

* :func:`microadam` / :func:`scale_by_microadam` -- MicroAdam (NeurIPS 2024):
  a sliding window of Top-K-sparse gradients plus 4-bit error feedback.
* :func:`apply_gradients` -- one optimizer step, update and parameters in
  one pass where the optimizer can (``microadam``'s GPU kernels).
* :func:`microadam_mixed` -- MicroAdam on the large tensors, dense Adam on
  norms, biases, small leaves and (optionally) embeddings.
* :func:`state_nbytes` -- bytes held by any optimizer state.
* :func:`state_shardings` -- the shardings of any optimizer state on a mesh.
* :func:`collectives` -- the collectives a compiled (sharded) step holds.
"""

from microadam_optax import model_shapes
from microadam_optax.adam_mini import ADAM_MINI_STATIC_ARGS
from microadam_optax.adam_mini import AdamMiniSegments
from microadam_optax.adam_mini import ScaleByAdamMiniState
from microadam_optax.adam_mini import adam_mini
from microadam_optax.adam_mini import scale_by_adam_mini
from microadam_optax.adam_mini_blocks import ADAM_MINI_AXIS_ROLES
from microadam_optax.adam_mini_blocks import ADAM_MINI_DEFAULT_AXIS_NAMES
from microadam_optax.adam_mini_blocks import ADAM_MINI_DEFAULT_RULES
from microadam_optax.adam_mini_blocks import AdamMiniRules
from microadam_optax.adam_mini_blocks import AdamMiniSpec
from microadam_optax.adam_mini_blocks import adam_mini_partition
from microadam_optax.gauss_newton import DEFAULT_LINESEARCH
from microadam_optax.gauss_newton import GaussNewtonState
from microadam_optax.gauss_newton import SQRT2_LINESEARCH
from microadam_optax.gauss_newton import gauss_newton
from microadam_optax.gauss_newton import global_cosine_schedule
from microadam_optax.gauss_newton import layer_partition
from microadam_optax.gauss_newton import output_hvp
from microadam_optax._sharding import collectives
from microadam_optax._sharding import state_shardings
from microadam_optax.fused import FusedGradientTransformation
from microadam_optax.fused import apply_gradients
from microadam_optax.memory import state_nbytes
from microadam_optax.microadam import DEFAULT_BLOCK_SIZE
from microadam_optax.microadam import MICROADAM_STATIC_ARGS
from microadam_optax.microadam import ScaleByMicroAdamState
from microadam_optax.microadam import deprecated_alias as _deprecated_alias
from microadam_optax.microadam import microadam
from microadam_optax.microadam import scale_by_microadam
from microadam_optax.microadam_mixed import DENSE_LABEL
from microadam_optax.microadam_mixed import EMBEDDING_NAMES
from microadam_optax.microadam_mixed import MICROADAM_LABEL
from microadam_optax.microadam_mixed import microadam_labels
from microadam_optax.microadam_mixed import microadam_mixed
from microadam_optax.microadam_mixed import scale_by_microadam_mixed
from microadam_optax.microadam_mixed import state_bytes_per_param

__version__ = "0.1.0"


def __getattr__(name: str):
  # Old names (MicroAdamState), with a DeprecationWarning.
  return _deprecated_alias(__name__, name)


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MICROADAM_STATIC_ARGS",
    "ScaleByMicroAdamState",
    "microadam",
    "scale_by_microadam",
    "FusedGradientTransformation",
    "apply_gradients",
    "DENSE_LABEL",
    "EMBEDDING_NAMES",
    "MICROADAM_LABEL",
    "microadam_labels",
    "microadam_mixed",
    "scale_by_microadam_mixed",
    "state_bytes_per_param",
    "model_shapes",
    "state_nbytes",
    "state_shardings",
    "collectives",
    "DEFAULT_LINESEARCH",
    "GaussNewtonState",
    "SQRT2_LINESEARCH",
    "gauss_newton",
    "global_cosine_schedule",
    "layer_partition",
    "output_hvp",
    "ADAM_MINI_AXIS_ROLES",
    "ADAM_MINI_DEFAULT_AXIS_NAMES",
    "ADAM_MINI_DEFAULT_RULES",
    "ADAM_MINI_STATIC_ARGS",
    "AdamMiniRules",
    "AdamMiniSegments",
    "AdamMiniSpec",
    "ScaleByAdamMiniState",
    "adam_mini",
    "adam_mini_partition",
    "scale_by_adam_mini",
]
