"""Test-session setup: eight host devices for the sharding tests.

XLA reads this flag when the CPU backend starts, so it must be set before any
test module imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "gpu: needs a GPU; skipped elsewhere (run on a GPU machine)")
