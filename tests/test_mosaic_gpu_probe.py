"""The Mosaic GPU probe lowers its control kernel on the JAX it runs on.

``experiments/mosaic_gpu_probe.py`` is the evidence for what Pallas' Mosaic
GPU back end cannot express of MicroAdam's GPU step (a sort, a prefix sum, a
gather, a data-dependent scatter). That evidence means something only while
the probe's element-wise control kernel lowers: on JAX 0.11.2 an earlier
probe failed for every row, control included (``pl.pallas_call`` has no
Mosaic GPU rule there any more), which said nothing about the back end.
Lowering for ``"cuda"`` needs no GPU.
"""

from __future__ import annotations

import pytest

pytest.importorskip("jax.experimental.pallas.mosaic_gpu")

from experiments import mosaic_gpu_probe as probe  # pylint: disable=g-import-not-at-top


def test_control_lowers_and_every_row_has_an_outcome(tmp_path):
  result = probe.main(["--json", str(tmp_path / "probe.json")])
  rows = result["rows"]
  assert {r["semantics"] for r in rows} == {"Lane", "Warpgroup"}
  assert all(r["outcome"] for r in rows)
  control = [r for r in rows if r["op"] == "element-wise add (control)"]
  assert len(control) == 2
  for r in control:
    assert r["outcome"].startswith("lowers"), r
  # Each needed operation either lowers or names why not (never an error
  # without a message, as the old probe's bare AssertionError was).
  for r in rows:
    assert r["outcome"].startswith("lowers") or ": " in r["outcome"], r
    assert not r["outcome"].startswith("AssertionError"), r
