"""microadam_compare: the training comparison built on :mod:`microadam_optax`.

``microadam-optax compare`` (see :mod:`microadam_compare.cli`) trains a
byte-level GPT on the Python standard library's sources, a CNN on
scikit-learn's 8x8 digits, and fine-tunes a pre-trained GPT on held-out
packages (and classifies which package a window comes from), with AdamW,
MicroAdam, Adam-mini, Adafactor, GaLore, Muon and Gauss-Newton (full and
layerwise); each optimizer's learning rate is tuned by runs as long as the
reported one, the final runs repeated over seeds. It writes a table, a JSON
file and plots.

Modules:

* :mod:`~microadam_compare.data` -- the corpora and batches.
* :mod:`~microadam_compare.models` -- the Flax NNX models.
* :mod:`~microadam_compare.tasks` -- data + model + loss.
* :mod:`~microadam_compare.pretrain` -- the cached pre-trained GPT of the
  fine-tuning tasks.
* :mod:`~microadam_compare.optimizers` -- the optimizer registry.
* :mod:`~microadam_compare.compare` -- tuning, seeded runs, metrics.
* :mod:`~microadam_compare.report` -- table and JSON.
* :mod:`~microadam_compare.plots` -- PNG figures.
* :mod:`~microadam_compare.cli` -- the command line.

This package is an application of the library, kept apart from it: it needs
the ``examples`` extra (Flax, Orbax, scikit-learn, matplotlib, tqdm), which
``import microadam_optax`` never imports.
"""
