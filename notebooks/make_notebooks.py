"""Writes the notebooks of this folder (without outputs) with nbformat.

  python notebooks/make_notebooks.py

Edit the cells here, not in the .ipynb files, then re-run this script; the
tests (tests/test_experiments.py) execute every notebook top to bottom.
"""

from __future__ import annotations

import os

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))

# Every notebook starts with this cell: it makes the repository importable
# when the package is not installed (running from a checkout).
SETUP = '''\
import os, sys
try:
  import microadam_optax  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
  sys.path.insert(0, os.path.abspath(".."))
  sys.path.insert(0, os.path.abspath("."))
import jax, jax.numpy as jnp, numpy as np, optax
import microadam_optax as mo
print("jax", jax.__version__, "optax", optax.__version__, "backend", jax.default_backend())'''


def _nb(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
  nb = v4.new_notebook()
  nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python",
                               "name": "python3"}
  nb.metadata["language_info"] = {"name": "python"}
  for i, (kind, text) in enumerate(cells):
    text = text.strip("\n")
    # Cell ids from the cell's place, so that regenerating an unchanged
    # notebook leaves its file unchanged.
    cell_id = f"cell-{i:02d}"
    nb.cells.append(v4.new_markdown_cell(text, id=cell_id) if kind == "md"
                    else v4.new_code_cell(text, id=cell_id))
  return nb


QUICKSTART = [
    ("md", """
# Quickstart: MicroAdam in an Optax chain

MicroAdam (Modoranu et al., NeurIPS 2024) keeps the last `m` gradients, each
compressed to its Top-K entries, plus a 4-bit error-feedback buffer, instead
of Adam's two dense moments: about **0.9 byte of state per parameter** against
8 for Adam in float32. It is an ordinary `optax.GradientTransformation`, so it
composes with `optax.chain`, `jax.jit` and the rest of the Optax toolbox.
"""),
    ("code", SETUP),
    ("md", """
## A regression problem

A two-layer MLP fitted to a fixed random teacher network.
"""),
    ("code", '''
key = jax.random.key(0)
k_x, k_t1, k_t2, k_p1, k_p2 = jax.random.split(key, 5)
x = jax.random.normal(k_x, (512, 32))
teacher = (jax.random.normal(k_t1, (32, 64)) / np.sqrt(32),
           jax.random.normal(k_t2, (64, 1)) / np.sqrt(64))
y = jnp.tanh(x @ teacher[0]) @ teacher[1]

params = {"hidden": {"kernel": jax.random.normal(k_p1, (32, 256)) / np.sqrt(32),
                     "bias": jnp.zeros(256)},
          "out": {"kernel": jax.random.normal(k_p2, (256, 1)) / np.sqrt(256),
                  "bias": jnp.zeros(1)}}

def loss_fn(params):
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  pred = h @ params["out"]["kernel"] + params["out"]["bias"]
  return jnp.mean((pred - y) ** 2)

n_params = sum(p.size for p in jax.tree.leaves(params))
print(n_params, "parameters, initial loss", float(loss_fn(params)))
'''),
    ("md", """
## MicroAdam in a chain, one jitted step

`mo.microadam(learning_rate, ..., window=10, density=0.01)` is
`chain(scale_by_microadam, add_decayed_weights, scale_by_learning_rate)`;
here it follows gradient clipping and uses a warmup-cosine schedule. The
step is jitted with the parameters and the state donated.
"""),
    ("code", '''
schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, 400, 1e-3)
tx = optax.chain(optax.clip_by_global_norm(1.0),
                 mo.microadam(schedule, weight_decay=1e-4, density=0.05))

def train_step(params, opt_state):
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss

step = jax.jit(train_step, donate_argnums=(0, 1))
p, s = jax.tree.map(jnp.copy, params), tx.init(params)
for i in range(400):
  p, s, loss = step(p, s)
  if i % 100 == 0 or i == 399:
    print(f"step {i:3d}  loss {float(loss):.5f}")
'''),
    ("md", """
## What the state holds

`mo.state_nbytes` counts the bytes of any state (concrete or from
`jax.eval_shape`). The MicroAdam state is the window of Top-K indices (int16)
and values (bf16) plus the packed 4-bit error codes and their per-block
ranges. On a model this small the per-block overheads still show; the next
cell measures real model shapes.
"""),
    ("code", '''
micro_state = s[1][0]  # chain: (clip state, (ScaleByMicroAdamState, decay, lr))
print(type(micro_state).__name__)
for field in ("window_indices", "window_values", "error_codes", "error_min"):
  leaf = getattr(micro_state, field)["hidden"]["kernel"]
  print(f"  {field:15s} {str(leaf.shape):15s} {leaf.dtype}")
for name, t in [("optax.adamw", optax.adamw(1e-3)), ("mo.microadam (5 %)", tx)]:
  print(f"{name:20s} {mo.state_nbytes(t.init(params)) / n_params:6.3f} bytes/param")
'''),
    ("md", """
## State memory on Llama-2-7B shapes, without allocating it

`jax.eval_shape(tx.init, shapes)` gives the state's shapes and dtypes only.
Float32 parameters (6.74 B of them in 291 tensors):
"""),
    ("code", '''
shapes = mo.model_shapes.llama2_shapes("llama2-7b", dtype=jnp.float32)
n = mo.model_shapes.num_params(shapes)
candidates = {
    "optax.adamw": optax.adamw(1e-3),
    "optax.adamw (bf16 mu)": optax.adamw(1e-3, mu_dtype=jnp.bfloat16),
    "mo.adam_mini": mo.adam_mini(1e-3),
    "mo.microadam (m=10, 1 %)": mo.microadam(1e-3),
    "optax.adafactor": optax.adafactor(1e-3),
}
print(f"{'optimizer':26s} {'state GB':>9s} {'B/param':>8s}")
for name, t in candidates.items():
  b = mo.state_nbytes(jax.eval_shape(t.init, shapes))
  print(f"{name:26s} {b / 1e9:9.2f} {b / n:8.3f}")
'''),
]


FLAX_TRAINING = [
    ("md", """
# Training a Flax NNX model with every optimizer

The comparison behind `microadam-optax compare`, small enough to run here:
a CNN on scikit-learn's 8x8 digits (real images, bundled with scikit-learn)
trained with AdamW, MicroAdam, Adam-mini, Adafactor, GaLore, Muon and
Gauss-Newton (full and layerwise). First the plain NNX way to use one of the
library's optimizers, then the functional loop the comparison uses for all.
"""),
    ("code", SETUP),
    ("md", """
## 1. `nnx.Optimizer` with MicroAdam

Any Optax transformation plugs into `nnx.Optimizer`.
"""),
    ("code", '''
from flax import nnx
from microadam_compare import data, models

ds = data.digits_dataset()
model = models.DigitsCNN(models.CNNConfig(), rngs=nnx.Rngs(0))
optimizer = nnx.Optimizer(model, mo.microadam(3e-3, density=0.05), wrt=nnx.Param)

@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss

for step in range(150):
  x, y = data.image_batches(ds, step, 1, 64, seed=0)
  loss = train_step(model, optimizer, x[0], y[0])
acc = float(jnp.mean(jnp.argmax(model(ds.x_val), -1) == ds.y_val))
print(f"loss {float(loss):.3f}, validation accuracy {acc:.3f}")
'''),
    ("md", """
## 2. The functional path every optimizer shares

`models.split_params` turns the model into a graph definition and a plain
`dict` of parameters; a task's `apply(params, x)` merges them back inside
the jitted step. First-order optimizers differentiate
`loss(apply(params, x), y)`; Gauss-Newton gets `model_fn = lambda p:
apply(p, x)` and `loss_fn = lambda z: loss(z, y)`. `compare.compare_task`
tunes each optimizer's learning rate by runs as long as the reported one
(growing the grid while the best rate is at an end), then repeats the best
rate over seeds; here the tuning is skipped (`tune=False` takes the middle of
each grid) and one seed is run, to keep the notebook short.
"""),
    ("code", '''
from microadam_compare import compare, optimizers, plots, report, tasks

task = tasks.digits_task("cpu", seed=0)
config = compare.RunConfig(steps=80, eval_every=20, gn_steps=8,
                           gn_eval_every=2, tune=False, seeds=(0,),
                           progress=False)
result = compare.compare_task(task, list(optimizers.REGISTRY), config)
print()
print(report.format_table(result))
'''),
    ("code", '''
%matplotlib inline
plots.plot_loss_vs_step(result, None, show=True)
plots.plot_loss_vs_time(result, None, show=True)
plots.plot_accuracy_vs_step(result, None, show=True)
plots.plot_state_bytes(result, None, show=True);
'''),
    ("md", """
The same run from the command line, tuned, over two seeds, with the
byte-level GPT and the fine-tuning tasks as well: `microadam-optax compare`
(the README gives its time), or `microadam-optax compare --quick` for a
smoke run.
"""),
]


GAUSS_NEWTON = [
    ("md", """
# Gauss-Newton against first-order optimizers

`mo.gauss_newton(inner_optimizer, inner_steps, layerwise=...)` (Abreu et al.,
2025) linearizes the model at the current parameters, minimises the
Gauss-Newton model of the batch loss with an inner Optax optimizer (one JVP
and one VJP per inner step, no matrix formed), and line-searches the step on
the true loss. Its `update` takes `model_fn` and `loss_fn` instead of a
gradient. Here: an MLP on the 8x8 digits, full-batch, comparing GN (full and
layerwise) with AdamW and Muon per iteration and per second.
"""),
    ("code", SETUP),
    ("code", '''
import time
from flax import nnx
from microadam_compare import data, models

ds = data.digits_dataset()
x_train = ds.x_train.reshape(len(ds.x_train), -1)
x_val = ds.x_val.reshape(len(ds.x_val), -1)

class MLP(nnx.Module):
  def __init__(self, rngs):
    self.dense1 = nnx.Linear(64, 64, rngs=rngs)
    self.dense2 = nnx.Linear(64, 64, rngs=rngs)
    self.output = nnx.Linear(64, 10, rngs=rngs)
  def __call__(self, x):
    return self.output(jnp.tanh(self.dense2(jnp.tanh(self.dense1(x)))))

graphdef, params0 = models.split_params(MLP(nnx.Rngs(0)))
apply = lambda p, x: models.merge_params(graphdef, p)(x)
xent = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
print(mo.layer_partition(params0))  # the layers of layerwise GN
'''),
    ("code", '''
def train(tx, steps, second_order):
  """Full-batch training; returns (val losses per step, seconds per step)."""
  def step(params, state):
    if second_order:
      updates, state = tx.update(None, state, params,
                                 model_fn=lambda p: apply(p, x_train),
                                 loss_fn=lambda z: xent(z, ds.y_train))
    else:
      grads = jax.grad(lambda p: xent(apply(p, x_train), ds.y_train))(params)
      updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  step = jax.jit(step)
  evaluate = jax.jit(lambda p: xent(apply(p, x_val), ds.y_val))
  params = jax.tree.map(jnp.asarray, params0)
  state = tx.init(params)
  jax.block_until_ready(step(params, state))  # compile
  losses, seconds = [float(evaluate(params))], 0.0
  for _ in range(steps):
    t0 = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state))
    seconds += time.perf_counter() - t0
    losses.append(float(evaluate(params)))
  return np.array(losses), seconds / steps, state

runs = {
    "AdamW": (optax.adamw(1e-2), 200, False),
    "Muon": (optax.contrib.muon(1e-2, consistent_rms=0.2), 200, False),
    "GN full (inner Adam)": (mo.gauss_newton(optax.adam(1e-2), inner_steps=20), 20, True),
    "GN layerwise": (mo.gauss_newton(optax.adam(1e-2), inner_steps=20, layerwise=True), 20, True),
}
results = {}
for name, (tx, steps, so) in runs.items():
  losses, sec, state = train(tx, steps, so)
  results[name] = (losses, sec)
  extra = f", last step size {float(state.step_size):g}" if so else ""
  print(f"{name:22s} {steps:3d} iterations, {1000 * sec:7.2f} ms each, "
        f"val loss {losses[-1]:.4f}{extra}")
'''),
    ("code", '''
%matplotlib inline
import matplotlib.pyplot as plt
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
for name, (losses, sec) in results.items():
  it = np.arange(len(losses))
  style = "--" if name.startswith("GN") else "-"
  a1.plot(it, losses, style, label=name)
  a2.plot(it * sec, losses, style, label=name)
a1.set_xlabel("iteration (GN: outer)"); a2.set_xlabel("seconds")
for a in (a1, a2):
  a.set_ylabel("validation loss"); a.set_yscale("log"); a.grid(alpha=0.3); a.legend()
plt.show()
'''),
    ("md", """
Per iteration, Gauss-Newton reaches a given loss in far fewer steps than the
first-order methods (the paper's point); per second, each outer iteration
costs about `inner_steps` forward-and-backward passes (times the number of
layers for the layerwise variant), so the comparison in wall-clock time is
much closer. `microadam-optax compare` reports both on a GPT and the CNN.
"""),
]


def main() -> None:
  """Writes the three notebooks next to this script."""
  for name, cells in (("quickstart.ipynb", QUICKSTART),
                      ("flax_training.ipynb", FLAX_TRAINING),
                      ("gauss_newton.ipynb", GAUSS_NEWTON)):
    path = os.path.join(HERE, name)
    nbformat.write(_nb(cells), path)
    print("wrote", path)


if __name__ == "__main__":
  main()
