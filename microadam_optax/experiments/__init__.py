"""Training comparisons of the library's optimizers on real data.

``microadam-optax compare`` (see :mod:`microadam_optax.experiments.cli`) trains
a byte-level GPT on the Python standard library's sources and a CNN on
scikit-learn's 8x8 digits with AdamW, MicroAdam, Adam-mini, Adafactor, GaLore,
Muon and Gauss-Newton (full and layerwise), each at its best learning rate
from a small grid, and writes a table, a JSON file and plots.

Modules:

* :mod:`~microadam_optax.experiments.data` -- the corpora and batches.
* :mod:`~microadam_optax.experiments.models` -- the Flax NNX models.
* :mod:`~microadam_optax.experiments.tasks` -- data + model + loss.
* :mod:`~microadam_optax.experiments.optimizers` -- the optimizer registry.
* :mod:`~microadam_optax.experiments.compare` -- sweeps, runs, metrics.
* :mod:`~microadam_optax.experiments.report` -- table and JSON.
* :mod:`~microadam_optax.experiments.plots` -- PNG figures.
* :mod:`~microadam_optax.experiments.cli` -- the command line.

Importing this package needs Flax (the ``examples`` extra); the optimizers in
:mod:`microadam_optax` do not.
"""
