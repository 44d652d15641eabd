"""The comparison harness: data loaders, models, registry, CLI and notebooks."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

from flax import nnx

import microadam_optax as mo
from microadam_compare import cli
from microadam_compare import compare
from microadam_compare import data
from microadam_compare import models
from microadam_compare import optimizers
from microadam_compare import report
from microadam_compare import tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("quickstart.ipynb", "flax_training.ipynb", "gauss_newton.ipynb")
SMALL = 60  # files of the stdlib corpus read by the loader tests


# ---------------------------------------------------------------------------
# The application apart from the library.


def _python(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, cwd=REPO, timeout=300, check=False)


def test_library_import_needs_no_application_dependency():
  done = _python(
      "import sys, microadam_optax, pallas_kernels\n"
      "print(sorted(m for m in sys.modules if m.split('.')[0] in "
      "('flax', 'sklearn', 'matplotlib', 'orbax', 'microadam_compare')))")
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "[]"


def test_compare_without_the_extra_prints_one_line():
  done = _python(
      "import sys\n"
      "sys.modules['flax'] = None  # as if flax were not installed\n"
      "from microadam_compare import cli\n"
      "sys.exit(cli.main(['compare', '--quick']))")
  assert done.returncode == 2
  lines = (done.stdout + done.stderr).strip().splitlines()
  assert len(lines) == 1, lines
  assert "flax" in lines[0] and "pip install" in lines[0]
  assert "[examples]" in lines[0]


# ---------------------------------------------------------------------------
# Language-modelling corpus.


def test_stdlib_corpus_is_deterministic_and_split_by_file():
  build = data.stdlib_corpus.__wrapped__  # bypass the cache
  a, b = build(max_files=SMALL), build(max_files=SMALL)
  assert a.train_files == b.train_files and a.val_files == b.val_files
  np.testing.assert_array_equal(a.train, b.train)
  np.testing.assert_array_equal(a.val, b.val)
  assert a.train_files and a.val_files
  assert not set(a.train_files) & set(a.val_files)
  assert len(a.train_files) + len(a.val_files) == SMALL
  assert list(a.train_files) == sorted(a.train_files)
  assert a.train.dtype == np.uint8 and a.val.dtype == np.uint8
  assert all(f.endswith(".py") and "site-packages" not in f
             and not f.split("/")[0].startswith("test")
             for f in a.train_files + a.val_files)
  # The training stream is the training files' bytes, in order.
  with open(os.path.join(a.root, a.train_files[0]), "rb") as f:
    first = f.read()
  assert a.train[:len(first)].tobytes() == first


def test_validation_split_is_a_pure_function_of_the_path():
  files = data.stdlib_files()
  assert len(files) > 200  # several MB of real code
  held_out = [f for f in files if data.is_validation_file(f, 10.0)]
  assert 0.04 < len(held_out) / len(files) < 0.2
  assert data.is_validation_file("a/b.py", 10.0) == data.is_validation_file(
      "a/b.py", 10.0)
  assert not data.is_validation_file("a/b.py", 0.0)
  assert data.is_validation_file("a/b.py", 100.0)


def test_lm_batches_are_deterministic_shifted_windows():
  corpus = data.stdlib_corpus(max_files=SMALL)
  x, y = data.lm_batches(corpus.train, 5, 3, 4, 16, seed=1)
  x2, y2 = data.lm_batches(corpus.train, 5, 3, 4, 16, seed=1)
  assert x.shape == y.shape == (3, 4, 16)
  assert x.dtype == y.dtype == np.int32
  assert x.min() >= 0 and x.max() < 256
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(x[..., 1:], y[..., :-1])
  # Batch s does not depend on where a chunk starts.
  x_one, _ = data.lm_batch(corpus.train, 6, 4, 16, seed=1)
  np.testing.assert_array_equal(x[1], x_one)
  x_other, _ = data.lm_batches(corpus.train, 5, 3, 4, 16, seed=2)
  assert not np.array_equal(x, x_other)
  ev1 = data.lm_eval_batches(corpus.val, 2, 4, 16)
  ev2 = data.lm_eval_batches(corpus.val, 2, 4, 16)
  np.testing.assert_array_equal(ev1[0], ev2[0])
  assert ev1[0].shape == (2, 4, 16)


def test_digits_split_is_stratified_and_deterministic():
  ds = data.digits_dataset()
  assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_train.dtype == np.float32
  assert ds.y_train.dtype == np.int32
  assert len(ds.y_train) + len(ds.y_val) == 1797
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  assert set(np.unique(ds.y_val)) == set(range(10))
  again = data.digits_dataset.__wrapped__()
  np.testing.assert_array_equal(ds.y_val, again.y_val)
  xb, yb = data.image_batches(ds, 3, 2, 16, seed=0)
  xb2, yb2 = data.image_batches(ds, 3, 2, 16, seed=0)
  assert xb.shape == (2, 16, 8, 8, 1) and yb.shape == (2, 16)
  np.testing.assert_array_equal(yb, yb2)


def test_held_out_packages_split_by_file_and_balanced_batches():
  corpus = data.package_corpus(max_files_per_package=3)
  assert corpus.packages == data.HELD_OUT_PACKAGES
  for train, val in zip(corpus.train_files, corpus.val_files):
    assert train and val and not set(train) & set(val)
  rest = data.stdlib_corpus(max_files=SMALL,
                            exclude_packages=data.HELD_OUT_PACKAGES)
  assert not {data.package_of(f) for f in rest.train_files + rest.val_files
              } & set(data.HELD_OUT_PACKAGES)
  x, y = data.package_batches(corpus.train, 3, 2, 8, 16, seed=1)
  x2, y2 = data.package_batches(corpus.train, 3, 2, 8, 16, seed=1)
  assert x.shape == (2, 8, 16) and y.shape == (2, 8)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  assert 0 <= y.min() and y.max() < len(corpus.packages)
  ex, ey = data.package_eval_batches(corpus.val, 3, 4, 16)
  assert ex.shape == (3, 4, 16)
  counts = np.bincount(ey.ravel(), minlength=len(corpus.packages))
  assert counts.max() - counts.min() <= 1


# ---------------------------------------------------------------------------
# Models.


@pytest.fixture(scope="module")
def tiny_gpt():
  """A tiny GPT and its split (eager initialization is slow on CPU)."""
  model = models.GPT(models.GPT_PRESETS["tiny"], rngs=nnx.Rngs(0))
  graphdef, params = models.split_params(model)
  return model, graphdef, params


def test_gpt_forward_and_sizes(tiny_gpt):
  config = models.GPT_PRESETS["tiny"]
  model, graphdef, params = tiny_gpt
  logits = model(jnp.zeros((2, config.seq_len), jnp.int32))
  assert logits.shape == (2, config.seq_len, 256)
  assert models.num_params(params) == config.num_params()
  again = models.merge_params(graphdef, params)(jnp.zeros((2, 8), jnp.int32))
  assert again.shape == (2, 8, 256)
  assert 1e6 <= models.GPT_PRESETS["cpu"].num_params() <= 5e6
  assert 50e6 <= models.GPT_PRESETS["gpu"].num_params() <= 150e6
  assert models.GPT_PRESETS["cpu"].seq_len == 128
  names = {"embed", "pos_embed", "blocks", "ln_f", "lm_head"}
  assert set(params) == names
  assert set(params["blocks"][0]["attn"]) == {"query", "key", "value", "out"}


@pytest.mark.parametrize("task", ["finetune", "finetune_cls"])
def test_gpu_finetuning_reads_its_data_about_once(task):
  """The gpu preset's fine-tuning run reads the held-out packages' training
  files about once: at four passes (32 sequences a batch) the 86 M GPT
  overfit them and every optimizer's best rate sat at the bottom of its
  grid."""
  corpus = data.package_corpus()
  train_bytes = sum(len(t) for t in corpus.train)
  steps = cli.SCHEDULES[(task, "gpu")]["steps"]
  read = (steps * tasks.FINETUNE_BATCH_SIZE["gpu"]
          * models.GPT_PRESETS["gpu"].seq_len)
  assert 0.5 <= read / train_bytes <= 2.0, (read, train_bytes)


def test_gpt_bfloat16_computes_in_bf16_and_keeps_float32_params(tiny_gpt):
  _, graphdef, params = tiny_gpt
  config = dataclasses.replace(models.GPT_PRESETS["tiny"], dtype="bfloat16")
  bf16 = models.GPT(config, rngs=nnx.Rngs(0))
  bf16_graphdef, bf16_params = models.split_params(bf16)
  # Same parameters (float32), whatever the compute dtype.
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(bf16_params)):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens = jnp.asarray(
      np.random.default_rng(0).integers(0, 256, (2, config.seq_len)),
      jnp.int32)

  def loss(graph, p):
    return tasks.cross_entropy(models.merge_params(graph, p)(tokens), tokens)

  l32, g32 = jax.value_and_grad(functools.partial(loss, graphdef))(params)
  l16, g16 = jax.value_and_grad(functools.partial(loss, bf16_graphdef))(
      bf16_params)
  assert models.merge_params(bf16_graphdef, bf16_params)(tokens).dtype == (
      jnp.bfloat16)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  # bf16 products (8-bit mantissa) change the loss by ~1e-3, not more.
  np.testing.assert_allclose(float(l16), float(l32), rtol=1e-2)
  assert float(l16) != float(l32)
  cos = [float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
         for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16))]
  assert min(cos) > 0.99, cos
  with pytest.raises(ValueError, match="dtype must be"):
    models.GPTConfig(dtype="float16")
  assert models.GPT_PRESETS["gpu"].dtype == "bfloat16"


def test_gpt_names_drive_adam_mini_partition(tiny_gpt):
  if not hasattr(mo, "adam_mini_partition"):
    pytest.skip("mo.adam_mini_partition is not exported")
  _, _, params = tiny_gpt
  spec = mo.adam_mini_partition(params)
  block = spec["blocks"][0]
  assert spec["embed"]["embedding"].rule == "embedding"
  assert spec["lm_head"]["kernel"].rule == "output"
  assert block["attn"]["query"]["kernel"].rule == "head"
  assert block["attn"]["value"]["kernel"].rule == "value"
  assert block["attn"]["out"]["kernel"].rule == "neuron"
  assert block["mlp"]["fc_in"]["kernel"].rule == "neuron"
  assert block["ln1"]["scale"].rule == "norm"


def test_gpt_layers_for_layerwise_gauss_newton(tiny_gpt):
  config = models.GPT_PRESETS["tiny"]
  _, _, params = tiny_gpt
  layers = mo.layer_partition(params, models.gpt_layer_id)
  assert len(layers) == config.num_layers + 2
  assert any("lm_head" in p for p in layers["head"])


def test_cnn_forward():
  model = models.DigitsCNN(models.CNNConfig(), rngs=nnx.Rngs(0))
  assert model(jnp.zeros((3, 8, 8, 1))).shape == (3, 10)
  _, params = models.split_params(model)
  assert set(params) == {"conv1", "conv2", "dense1", "output"}


# ---------------------------------------------------------------------------
# Registry and schedule.


def test_registry_names_and_clear_errors():
  assert list(optimizers.REGISTRY) == [
      "adamw", "microadam", "adam_mini", "adafactor", "galore", "muon",
      "gn_full", "gn_layerwise"]
  with pytest.raises(KeyError, match="known"):
    optimizers.get("sgdx")
  fake = optimizers.OptimizerSpec("x", "X", lambda lr, ctx: None, (1.0,),
                                  "mo.does_not_exist")
  assert "mo.does_not_exist is not available" in optimizers.unavailable_reason(
      fake)
  fake_optax = optimizers.OptimizerSpec("y", "Y", lambda lr, ctx: None, (1.0,),
                                        "optax.contrib.does_not_exist")
  assert "installed optax" in optimizers.unavailable_reason(fake_optax)


def test_hidden_matrices_exclude_embeddings_and_heads(tiny_gpt):
  _, _, params = tiny_gpt
  flags = jax.tree_util.tree_map_with_path(optimizers.is_hidden_matrix, params)
  assert not flags["embed"]["embedding"] and not flags["lm_head"]["kernel"]
  assert flags["blocks"][0]["attn"]["query"]["kernel"]
  assert not flags["blocks"][0]["ln1"]["scale"]


def test_warmup_cosine():
  f = lambda c: float(compare.warmup_cosine(c, 100))
  assert f(0) == pytest.approx(1 / 5)
  assert f(4) == pytest.approx(1.0)
  assert f(100) == pytest.approx(compare.FINAL_LR_FRACTION)
  assert f(50) < f(10)


# ---------------------------------------------------------------------------
# The command line, end to end.


def test_cli_help_documents_the_flags(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["compare", "--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for flag in ("--task", "--preset", "--steps", "--optimizers", "--out",
               "--seed", "--seeds", "--quick", "--cache-dir", "finetune",
               "--max-grid-extensions"):
    assert flag in text


QUICK_OPTIMIZERS = ("adamw", "microadam", "gn_full")


def _quick(out, cache, *extra):
  return cli.main(["compare", "--quick", "--out", str(out), "--no-progress",
                   "--cache-dir", str(cache), *extra])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  """One smoke run of every task (tiny preset, two seeds) and its output."""
  root = tmp_path_factory.mktemp("quick")
  code = _quick(root / "run", root / "cache", "--optimizers",
                ",".join(QUICK_OPTIMIZERS), "--seeds", "2")
  with open(root / "run" / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  return code, root, results


def test_cli_quick_run_keeps_the_results_contract(quick_run):
  code, root, results = quick_run
  assert code == 0
  assert [t["task"] for t in results["tasks"]] == [
      "lm", "digits", "finetune", "finetune_cls"]
  assert results["seeds"] == [0, 1]
  for task in results["tasks"]:
    by_name = {r["name"]: r for r in task["results"]}
    assert list(by_name) == list(QUICK_OPTIMIZERS)
    for name, r in by_name.items():
      where = (task["task"], name, r.get("message"))
      assert r["status"] == "ok", where
      assert r["seeds"] == [0, 1]
      per_seed = r["final_val_loss_per_seed"]
      assert len(per_seed) == 2 and all(math.isfinite(v) for v in per_seed)
      assert r["final_val_loss_mean"] == pytest.approx(np.mean(per_seed))
      assert r["final_val_loss_std"] == pytest.approx(np.std(per_seed,
                                                             ddof=1))
      # Tuned at full length: every rate ran as long as the final runs.
      assert r["sweep_steps"] == r["steps_run"] > 0, where
      assert r["lr_grid"] == sorted(r["lr_grid"]) and len(r["lr_grid"]) >= 3
      assert set(r["initial_lr_grid"]) <= set(r["lr_grid"])
      assert len(r["lr_grid"]) == (len(r["initial_lr_grid"])
                                   + r["grid_extensions"])
      assert r["best_lr"] in r["lr_grid"]
      assert [s["lr"] for s in r["sweep"]] == r["lr_grid"]
      best = min(r["sweep"], key=lambda s: s["val_loss"])
      assert best["lr"] == r["best_lr"]
      assert best["val_loss"] == pytest.approx(per_seed[0])
      inside = r["lr_grid"][0] < r["best_lr"] < r["lr_grid"][-1]
      assert r["best_lr_at_grid_edge"] == (not inside)
      if r["best_lr_at_grid_edge"]:
        assert (r["grid_extensions"] == r["max_grid_extensions"]
                == optimizers.MAX_GRID_EXTENSIONS)
      assert isinstance(r["second_order"], bool)
      assert r["second_order"] == optimizers.get(name).second_order
      assert r["steps"][0] == 0 and len(r["steps"]) == len(r["val_loss"])
      assert len(r["val_loss_std"]) == len(r["val_loss"])
      assert r["state_bytes"] > 0 and r["step_time_s"] > 0
    assert by_name["adamw"]["state_bytes_per_param"] == pytest.approx(8, 0.01)
    assert by_name["microadam"]["state_bytes_per_param"] < 1.5
    # Gauss-Newton keeps its inner optimizer's state and iterate (the
    # paper's protocol): both are reported, not 0 B/param.
    assert by_name["gn_full"]["state_bytes_per_param"] > 4
  pre = results["tasks"][2]["metadata"]["pretrain"]
  assert pre["val_loss"][-1] < pre["val_loss"][0]
  assert pre["path"].startswith(str(root / "cache"))
  out = root / "run"
  for name in ("table.txt", "lm_loss_vs_step.png", "lm_loss_vs_time.png",
               "lm_state_bytes.png", "digits_loss_vs_step.png",
               "digits_accuracy_vs_step.png", "finetune_loss_vs_step.png",
               "finetune_cls_accuracy_vs_step.png", "pretrain_curve.png",
               "loss_vs_state.png", "lm_loss_vs_state.png"):
    assert (out / name).stat().st_size > 0, name
  table = (out / "table.txt").read_text(encoding="utf-8")
  for text in ("steps→tgt", "state B/p", "± ", "s→tgt / ", "step MiB:",
               "outer", "tokens→tgt", "inner", "clip"):
    assert text in table, text
  assert "peak MiB" not in table.splitlines()[1]  # nothing to show on CPU


def test_same_command_gives_the_same_numbers(quick_run, tmp_path):
  _, root, first = quick_run
  code = _quick(tmp_path / "again", root / "cache", "--task", "lm",
                "--optimizers", ",".join(QUICK_OPTIMIZERS), "--seeds", "2",
                "--no-plots")
  assert code == 0
  with open(tmp_path / "again" / "results.json", encoding="utf-8") as f:
    again = json.load(f)
  for a, b in zip(first["tasks"][0]["results"], again["tasks"][0]["results"]):
    for key in ("final_val_loss_per_seed", "val_loss", "sweep", "best_lr",
                "lr_grid", "train_loss"):
      assert a[key] == b[key], (a["name"], key)


def test_pretrained_checkpoint_is_cached_and_deterministic(quick_run,
                                                           tmp_path):
  from microadam_compare import pretrain  # pylint: disable=g-import-not-at-top
  _, root, _ = quick_run
  cached, info = pretrain.pretrained_gpt("tiny", cache_dir=str(root / "cache"))
  assert info["cached"]
  fresh, info2 = pretrain.pretrained_gpt("tiny", cache_dir=str(tmp_path))
  assert not info2["cached"] and info2["val_loss"] == info["val_loss"]
  for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(a, b)
  # The key names what the checkpoint depends on.
  assert os.path.basename(info["path"]).startswith("tiny-")
  assert info["key"]["held_out_packages"] == list(data.HELD_OUT_PACKAGES)


class _StubRunner:
  """Stands in for compare._Runner: the final loss is a parabola in
  log10(lr) with its minimum at ``best`` (``1e-2``)."""

  def __init__(self, best=1e-2):
    self.rates = []
    self.best = best

  def run(self, task, lr, steps, bar=None):
    del task, steps, bar
    self.rates.append(lr)
    return {"val_loss": [(math.log10(lr) - math.log10(self.best)) ** 2]}


def test_tuning_grows_the_grid_until_the_best_rate_is_inside():
  runner = _StubRunner()
  best, records, extensions, at_edge = compare.tune(
      runner, None, (1e-4, 3e-4, 1e-3), 10, max_extensions=6)
  assert best == 1e-2 and not at_edge and extensions == 3
  assert sorted(records) == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
  capped = compare.tune(_StubRunner(), None, (1e-4, 3e-4, 1e-3), 10,
                        max_extensions=2)
  assert capped[0] == 1e-2 and capped[2] == 2 and capped[3]
  down = compare.tune(_StubRunner(), None, (1e-1, 3e-1, 1.0), 10,
                      max_extensions=6)
  assert down[0] == 1e-2 and not down[3]


def test_default_cap_finds_a_sparse_optimizer_s_short_run_rate_inside():
  """MicroAdam on the tiny preset at 40 steps: grid (3e-4, 1e-3, 3e-3), best
  rate 1e-1, three half-decades above the grid's top. The default cap (the
  CLI's too) reaches it and one rate beyond, so it is inside; the old cap of
  two left the winner at 3e-2, at the grid's end."""
  assert compare.RunConfig().max_grid_extensions == (
      optimizers.MAX_GRID_EXTENSIONS)
  args = cli.build_parser().parse_args(["compare"])
  assert args.max_grid_extensions == optimizers.MAX_GRID_EXTENSIONS
  grid = optimizers.get("microadam").grid_for("lm")
  best, records, extensions, at_edge = compare.tune(
      _StubRunner(best=1e-1), None, grid, 10,
      compare.RunConfig().max_grid_extensions)
  assert best == pytest.approx(1e-1) and not at_edge and extensions == 4
  assert max(records) == pytest.approx(3e-1)
  old = compare.tune(_StubRunner(best=1e-1), None, grid, 10, 2)
  assert old[0] == pytest.approx(3e-2) and old[3]


def test_ties_are_differences_within_two_std():
  a = {"final_val_loss_per_seed": [1.0, 1.2], "final_val_loss_mean": 1.1,
       "final_val_loss_std": 0.1}
  b = dict(a, final_val_loss_mean=1.25, final_val_loss_std=0.05)
  c = dict(a, final_val_loss_mean=1.5, final_val_loss_std=0.05)
  assert compare.is_tie(a, b) and not compare.is_tie(a, c)
  one_seed = dict(a, final_val_loss_per_seed=[1.0])
  assert compare.is_tie(a, one_seed) is None


def test_first_order_optimizers_clip_gauss_newton_does_not():
  task = tasks.digits_task("tiny")
  adamw = compare.make_optimizer(optimizers.get("adamw"), task, 1e-3, 10)
  big = jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), task.init_params)
  params = jax.tree.map(jnp.asarray, task.init_params)
  clip = optax.clip_by_global_norm(1.0)
  clipped, _ = clip.update(big, clip.init(params))
  inner = optimizers.get("adamw").build(
      lambda c: 1e-3 * compare.warmup_cosine(c, 10), task.context)
  u1, _ = adamw.update(big, adamw.init(params), params)
  u2, _ = inner.update(clipped, inner.init(params), params)
  for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  gn = compare.make_optimizer(optimizers.get("gn_full"), task, 1e-3, 10)
  assert not isinstance(gn.init(params)[0], optax.EmptyState)


def test_version_quick_folder_and_closed_pipe(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  assert e.value.code == 0
  assert mo.__version__ in capsys.readouterr().out
  assert cli.QUICK_OUT != cli.DEFAULT_OUT
  done = subprocess.run(
      f"{sys.executable} -m microadam_compare.cli list | head -n 1",
      shell=True, capture_output=True, text=True, cwd=REPO, timeout=120,
      check=False)
  assert done.returncode == 0 and done.stdout.strip()
  assert "BrokenPipe" not in done.stderr and "Traceback" not in done.stderr


def _fake_result(rng, name: str, steps: int, every: int) -> dict:
  """A result entry shaped like run_optimizer's, with random curves."""
  xs = list(range(0, steps + 1, every))
  losses = list(np.sort(rng.uniform(1.0, 5.0, len(xs)))[::-1])
  lr = float(rng.choice([1e-3, 3e-3]))
  return {
      "name": name, "label": optimizers.get(name).label, "status": "ok",
      "second_order": optimizers.get(name).second_order, "best_lr": lr,
      "lr_grid": [1e-3, 3e-3], "sweep": [{"lr": 1e-3, "val_loss": 4.0},
                                         {"lr": 3e-3, "val_loss": 3.5}],
      "steps": xs, "val_loss": losses, "val_acc": list(rng.uniform(0, 1, len(xs))),
      "time_s": [0.01 * x for x in xs], "steps_run": steps,
      "final_val_loss": losses[-1], "final_val_acc": 0.5,
      "state_bytes_per_param": float(rng.uniform(0.5, 8)),
      "step_time_s": 0.01, "compile_s": 1.0,
  }


def _fake_report(rng, names, num_params=1000) -> dict:
  return {"command": ["microadam-optax", "compare"], "tasks": [{
      "task": "lm", "description": "fake", "num_params": num_params,
      "loss_unit": "nats/byte", "target_loss": None,
      "results": [_fake_result(rng, n, 40, 10) for n in names]}]}


def test_cli_report_joins_separate_runs(tmp_path, capsys):
  rng = np.random.default_rng()
  a = _fake_report(rng, ["adamw", "microadam"])
  b = _fake_report(rng, ["muon", "gn_full"])
  b["tasks"][0]["results"][0]["val_loss"][1] = math.nan  # written as null
  for name, rep in (("a", a), ("b", b)):
    report.write_json(rep, str(tmp_path / name / "results.json"))
  out = tmp_path / "ab"
  code = cli.main(["report", str(tmp_path / "a"),
                   str(tmp_path / "b" / "results.json"), "--out", str(out)])
  printed = capsys.readouterr().out
  assert code == 0, printed
  with open(out / "results.json", encoding="utf-8") as f:
    merged = json.load(f)
  (task,) = merged["tasks"]
  assert [r["name"] for r in task["results"]] == [
      "adamw", "microadam", "muon", "gn_full"]
  # The target is AdamW's final loss; steps to it are recomputed for all.
  adamw_final = a["tasks"][0]["results"][0]["final_val_loss"]
  assert task["target_loss"] == pytest.approx(adamw_final)
  for r, src in zip(task["results"], a["tasks"][0]["results"]
                    + b["tasks"][0]["results"]):
    hits = [s for s, v in zip(src["steps"], src["val_loss"])
            if math.isfinite(v) and v <= adamw_final]
    assert r["steps_to_target"] == (hits[0] if hits else None)
  assert len(merged["merged_from"]) == 2
  for label in ("AdamW", "MicroAdam", "Muon", "GN (full)"):
    assert label in printed
  assert (out / "lm_loss_vs_step.png").stat().st_size > 0


def test_table_marks_a_result_that_learnt_nothing():
  """A row whose mean final loss is not below its loss at step 0 (a tuning
  whose chosen rate failed, as Adam-mini's first fine-tuning classifier
  grid did on the gpu preset) is marked, and the legend says why; a row
  that learnt is not."""
  rng = np.random.default_rng()
  rep = _fake_report(rng, ["adamw", "adam_mini"])
  adamw, mini = rep["tasks"][0]["results"]
  start = float(rng.uniform(1.3, 1.5))
  # Up after the start, back down to just above it: learnt nothing.
  mini["val_loss"] = [start, 2 * start] + [start * 1.01] * (
      len(mini["steps"]) - 2)
  mini["final_val_loss"] = mini["val_loss"][-1]
  assert report.did_not_learn(mini) and not report.did_not_learn(adamw)
  just_below = dict(mini, final_val_loss=start * 0.999)
  assert not report.did_not_learn(just_below)
  # Diverged: nan in a fresh result, null (None) once read back from JSON.
  for final in (math.nan, None):
    assert report.did_not_learn(dict(adamw, final_val_loss=final))
  table = report.format_table(rep["tasks"][0])
  rows = {line.split()[0]: line for line in table.splitlines()
          if line.startswith(("AdamW", "Adam-mini"))}
  assert "✗" in rows["Adam-mini"] and "✗" not in rows["AdamW"]
  assert "✗: the mean final loss is not below" in report.legend(rep["tasks"])
  rep["tasks"][0]["results"] = [adamw]
  assert "✗" not in report.legend(rep["tasks"])


def test_report_counts_data_of_results_written_before_it_was_counted(
    tmp_path):
  """A first-order result without ``tokens_seen`` (written before results
  counted their data) is read back with the counts a new run writes: the
  task's batch tokens a step; Gauss-Newton results are left without."""
  assert _quick(tmp_path / "run", tmp_path / "cache", "--task", "lm",
                "--optimizers", "adamw,gn_full", "--seeds", "1",
                "--no-plots") == 0
  path = tmp_path / "run" / "results.json"
  with open(path, encoding="utf-8") as f:
    new = json.load(f)
  keys = ("data_unit", "tokens_per_batch", "tokens_per_step", "tokens_seen",
          "tokens_run")
  old = json.loads(json.dumps(new))
  for r in old["tasks"][0]["results"]:
    for key in keys:
      r.pop(key, None)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(old, f)
  adamw, gn = report.read_report(str(path))["tasks"][0]["results"]
  written = new["tasks"][0]["results"][0]
  assert adamw["tokens_seen"][-1] == written["tokens_seen"][-1] > 0
  for key in keys:
    assert adamw[key] == written[key], key
  assert gn["second_order"] and "tokens_seen" not in gn


def test_report_joins_seed_runs_into_the_single_run(tmp_path, capsys):
  """Tuning on seed 0 in one job and seed 1 in another, joined by report,
  gives the result of one run over both seeds."""
  def run(name, *extra):
    assert _quick(tmp_path / name, tmp_path / "cache", "--task", "lm",
                  "--optimizers", "adamw", "--no-plots", *extra) == 0
    with open(tmp_path / name / "results.json", encoding="utf-8") as f:
      return json.load(f)["tasks"][0]["results"][0]

  whole = run("whole", "--seeds", "2")
  tuned = run("tuned", "--seeds", "1")
  rest = run("rest", "--seed", "1", "--seeds", "1", "--no-tune", "--lr-grid",
             f"adamw={tuned['best_lr']}")
  assert rest["sweep"] == [] and tuned["sweep"]
  code = cli.main(["report", str(tmp_path / "rest"), str(tmp_path / "tuned"),
                   "--out", str(tmp_path / "joined"), "--no-plots"])
  assert code == 0, capsys.readouterr()
  with open(tmp_path / "joined" / "results.json", encoding="utf-8") as f:
    (joined,) = json.load(f)["tasks"][0]["results"]
  assert joined["seeds"] == whole["seeds"] == [0, 1]
  for key in ("final_val_loss_per_seed", "final_val_loss_mean",
              "final_val_loss_std", "final_val_acc_std", "val_loss",
              "val_loss_std", "val_acc", "val_acc_std", "lr_grid", "sweep",
              "best_lr", "best_lr_at_grid_edge", "train_loss", "steps"):
    np.testing.assert_allclose(
        np.asarray(joined[key] if key != "sweep" else
                   [x["val_loss"] for x in joined[key]], float),
        np.asarray(whole[key] if key != "sweep" else
                   [x["val_loss"] for x in whole[key]], float),
        rtol=1e-12, err_msg=key)
  assert joined["final_val_loss_per_seed"][0] != (
      joined["final_val_loss_per_seed"][1])
  # Overlapping seeds or another rate are not seeds of one run.
  other = dict(rest, best_lr=rest["best_lr"] * 3)
  with pytest.raises(ValueError, match="best_lr"):
    report.join_seeds(tuned, other)
  with pytest.raises(ValueError, match="seeds differ"):
    report.join_seeds(tuned, dict(rest, seeds=[0]))
  with pytest.raises(ValueError, match="both runs tuned"):
    report.join_seeds(tuned, dict(rest, sweep=tuned["sweep"]))


def test_report_merge_refuses_mismatched_runs(tmp_path, capsys):
  rng = np.random.default_rng()
  with pytest.raises(ValueError, match="num_params"):
    report.merge_reports([_fake_report(rng, ["adamw"]),
                          _fake_report(rng, ["muon"], num_params=7)],
                         ["x.json", "y.json"])
  with pytest.raises(ValueError, match="'adamw'.*both x.json and y.json"):
    report.merge_reports([_fake_report(rng, ["adamw"]),
                          _fake_report(rng, ["adamw"])], ["x.json", "y.json"])
  bad = tmp_path / "bad.json"
  bad.write_text("[1, 2]", encoding="utf-8")
  assert cli.main(["report", str(bad), "--out", str(tmp_path / "o")]) == 2
  assert "not a report" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Notebooks.


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  path = os.path.join(REPO, "notebooks", name)
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      "commit notebooks without outputs (python notebooks/make_notebooks.py)")
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": os.path.join(REPO, "notebooks")}})
  client.execute()
  errors = [o for c in nb.cells for o in c.get("outputs", ())
            if o.get("output_type") == "error"]
  assert not errors


def test_cli_lists_each_written_file_once(tmp_path, capsys):
  # Both fine-tuning tasks plot the same pre-training curve.
  plot = str(tmp_path / "pretrain_curve.png")
  files = cli._write_outputs(["a table"], {"tasks": []}, str(tmp_path),
                             [plot, str(tmp_path / "x.png"), plot])
  assert len(files) == len(set(files)) == 4
  assert "wrote 4 files" in capsys.readouterr().out
