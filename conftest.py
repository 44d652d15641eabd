"""Collection rules for ``pytest --doctest-modules`` run from the repository root."""

import importlib.util

# The GPU kernel's body imports Triton at the top; CPU-only installs have no
# Triton (the kernel is never traced there), so its module is not imported
# for doctests (it holds none).
collect_ignore = []
if importlib.util.find_spec("triton") is None:
  collect_ignore.append("pallas_kernels/gpu/step_kernel.py")
