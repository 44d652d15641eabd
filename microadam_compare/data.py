"""Real data present on every machine: Python's own sources and sklearn digits.

* :func:`stdlib_corpus` -- a byte-level language-modelling corpus built from the
  ``.py`` files of the running interpreter's standard library (several MB of
  real code, no download), split into training and validation sets *by file*.
* :func:`digits_dataset` -- the 8x8 handwritten digits bundled with
  scikit-learn (1797 images, 10 classes), split into training and validation
  sets, stratified by class.

Batches are pure functions of ``(seed, step)``, so every optimizer of a
comparison sees exactly the same data in the same order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig
from typing import Optional, Sequence

import numpy as np

# Directories of the standard library left out of the corpus: the test suites
# (huge, repetitive and full of odd byte strings), third-party packages and
# the generated caches.
EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__", "test",
                 "tests", "idle_test", "lib2to3", "ensurepip")

#: Bytes that separate two files in the concatenated corpus (a form feed and
#: a newline: rare in real code, valid in Python).
FILE_SEPARATOR = b"\n\x0c\n"


@dataclasses.dataclass(frozen=True)
class ByteCorpus:
  """A byte-level corpus split by file.

  Attributes:
    train: the training files' bytes, concatenated, ``uint8``.
    val: the validation files' bytes, concatenated, ``uint8``.
    train_files: paths (relative to ``root``) of the training files, sorted.
    val_files: paths of the validation files, sorted.
    root: the directory the files were read from.
  """
  train: np.ndarray
  val: np.ndarray
  train_files: tuple[str, ...]
  val_files: tuple[str, ...]
  root: str

  @property
  def vocab_size(self) -> int:
    """Number of token ids (every byte value)."""
    return 256


def stdlib_root() -> str:
  """The directory of the running interpreter's standard library."""
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: Optional[str] = None) -> list[str]:
  """The standard library's ``.py`` files, relative to ``root``, sorted.

  Test suites, ``site-packages`` and caches are skipped (:data:`EXCLUDED_DIRS`).

  Args:
    root: the directory to walk; ``None``: :func:`stdlib_root`.

  Returns:
    Sorted ``/``-separated relative paths.
  """
  root = stdlib_root() if root is None else root
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS
                   and not d.startswith("test")]
    rel_dir = os.path.relpath(dirpath, root)
    for name in filenames:
      if name.endswith(".py"):
        rel = os.path.normpath(os.path.join(rel_dir, name))
        found.append(rel.replace(os.sep, "/"))
  return sorted(found)


def is_validation_file(path: str, val_percent: float) -> bool:
  """Whether ``path`` belongs to the validation split.

  A pure function of the path (the first 8 bytes of its SHA-1 mapped to
  ``[0, 100)``), so the split is the same on every machine and does not move
  when files are added or removed.

  Args:
    path: a relative path, as returned by :func:`stdlib_files`.
    val_percent: the share of files to put in the validation split, in
      ``[0, 100]``.

  Returns:
    ``True`` for a validation file.
  """
  digest = hashlib.sha1(path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % 10_000 < val_percent * 100


def _read(root: str, paths: Sequence[str]) -> np.ndarray:
  chunks = []
  for rel in paths:
    with open(os.path.join(root, rel), "rb") as f:
      chunks.append(f.read())
  return np.frombuffer(FILE_SEPARATOR.join(chunks), dtype=np.uint8).copy()


def package_of(path: str) -> str:
  """The top-level package of a relative path (``""`` for a module at the
  top)."""
  return path.split("/")[0] if "/" in path else ""


@functools.lru_cache(maxsize=4)
def stdlib_corpus(val_percent: float = 10.0, max_files: Optional[int] = None,
                  root: Optional[str] = None,
                  exclude_packages: tuple[str, ...] = ()) -> ByteCorpus:
  """The byte-level corpus of the standard library's Python sources.

  Files are read in sorted order and split by file with
  :func:`is_validation_file`, so no file contributes to both splits.

  Args:
    val_percent: share of the files held out for validation (default 10 %).
    max_files: read only the first ``max_files`` files of the sorted list
      (for tests and smoke runs); ``None``: all of them (~600 files, ~11 MB on
      CPython 3.11).
    root: the directory to read; ``None``: :func:`stdlib_root`.
    exclude_packages: top-level packages left out (the fine-tuning tasks'
      held-out packages), before ``max_files`` applies.

  Returns:
    A :class:`ByteCorpus`. Results are cached per argument tuple.

  Example:
    >>> from microadam_compare import data
    >>> corpus = data.stdlib_corpus(max_files=40)
    >>> overlap = set(corpus.train_files) & set(corpus.val_files)
    >>> corpus.train.dtype, len(overlap)
    (dtype('uint8'), 0)
  """
  if not 0 <= val_percent <= 100:
    raise ValueError(f"val_percent must be in [0, 100], got {val_percent}.")
  root = stdlib_root() if root is None else root
  files = [f for f in stdlib_files(root)
           if package_of(f) not in exclude_packages]
  if max_files is not None:
    files = files[:max_files]
  if not files:
    raise FileNotFoundError(f"No .py files found under {root!r}.")
  val = tuple(f for f in files if is_validation_file(f, val_percent))
  train = tuple(f for f in files if not is_validation_file(f, val_percent))
  if len(files) < 2:
    raise ValueError("stdlib_corpus needs at least two files.")
  # Tiny selections: keep at least one file on each side, deterministically.
  if not val:
    val = (files[-1],)
  train = tuple(f for f in files if f not in val)
  if not train:
    train, val = val[:1], val[1:]
  return ByteCorpus(train=_read(root, train), val=_read(root, val),
                    train_files=train, val_files=val, root=root)


#: The stdlib packages held out of the pre-training corpus for the
#: fine-tuning tasks (present in CPython 3.10-3.13, each of several files;
#: four, so that a few hundred windows teach the classifier something: with
#: six, a bag-of-bytes logistic regression on 480 windows is at chance).
HELD_OUT_PACKAGES = ("asyncio", "email", "xml", "unittest")


@dataclasses.dataclass(frozen=True)
class PackageCorpus:
  """The sources of a few packages, each split by file.

  Attributes:
    packages: the package names (class ``i`` is ``packages[i]``).
    train: per package, its training files' bytes, concatenated.
    val: per package, its validation files' bytes, concatenated.
    train_files: per package, its training files.
    val_files: per package, its validation files.
  """
  packages: tuple[str, ...]
  train: tuple[np.ndarray, ...]
  val: tuple[np.ndarray, ...]
  train_files: tuple[tuple[str, ...], ...]
  val_files: tuple[tuple[str, ...], ...]


@functools.lru_cache(maxsize=4)
def package_corpus(packages: tuple[str, ...] = HELD_OUT_PACKAGES,
                   val_percent: float = 20.0,
                   max_files_per_package: Optional[int] = None,
                   root: Optional[str] = None) -> PackageCorpus:
  """The held-out packages' sources, each split by file into training and
  validation (:func:`is_validation_file`; at least one file on each side).

  Args:
    packages: top-level stdlib packages.
    val_percent: share of each package's files held out for validation.
    max_files_per_package: read only the first files of each (smoke runs).
    root: the directory to read; ``None``: :func:`stdlib_root`.

  Returns:
    A :class:`PackageCorpus`. Results are cached per argument tuple.

  Example:
    >>> from microadam_compare import data
    >>> corpus = data.package_corpus(("json", "email"),
    ...                              max_files_per_package=3)
    >>> corpus.packages, [len(f) for f in corpus.val_files]
    (('json', 'email'), [1, 1])
  """
  root = stdlib_root() if root is None else root
  all_files = stdlib_files(root)
  train, val, train_files, val_files = [], [], [], []
  for package in packages:
    files = [f for f in all_files if package_of(f) == package]
    if max_files_per_package is not None:
      files = files[:max_files_per_package]
    if len(files) < 2:
      raise ValueError(f"Package {package!r} has fewer than two files under "
                       f"{root!r}.")
    held = [f for f in files if is_validation_file(f, val_percent)] or [
        files[-1]]
    if len(held) == len(files):
      held = held[1:]
    kept = [f for f in files if f not in held]
    train.append(_read(root, kept))
    val.append(_read(root, held))
    train_files.append(tuple(kept))
    val_files.append(tuple(held))
  return PackageCorpus(packages=tuple(packages), train=tuple(train),
                       val=tuple(val), train_files=tuple(train_files),
                       val_files=tuple(val_files))


def concatenate(streams: Sequence[np.ndarray]) -> np.ndarray:
  """Byte streams joined by :data:`FILE_SEPARATOR`."""
  sep = np.frombuffer(FILE_SEPARATOR, dtype=np.uint8)
  parts = []
  for i, s in enumerate(streams):
    if i:
      parts.append(sep)
    parts.append(s)
  return np.concatenate(parts)


def package_batches(streams: Sequence[np.ndarray], start_step: int,
                    num_steps: int, batch_size: int, seq_len: int,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Training batches of "which package is this window from": a uniformly
  drawn package, then a random window of its training stream.

  Returns:
    ``(windows, labels)`` of shapes ``[num_steps, batch_size, seq_len]``
    (``int32`` bytes) and ``[num_steps, batch_size]`` (``int32``); batch
    ``s`` is a pure function of ``(seed, s)``.
  """
  xs, ys = [], []
  for s in range(start_step, start_step + num_steps):
    rng = _rng(seed, s, 2)
    labels = rng.integers(0, len(streams), size=batch_size)
    rows = []
    for c in labels:
      n = streams[c].shape[0] - seq_len
      start = int(rng.integers(0, max(n, 1)))
      rows.append(streams[c][start:start + seq_len])
    xs.append(np.stack(rows).astype(np.int32))
    ys.append(labels.astype(np.int32))
  return np.stack(xs), np.stack(ys)


def package_eval_batches(streams: Sequence[np.ndarray], num_batches: int,
                         batch_size: int, seq_len: int
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Fixed, class-balanced evaluation batches: windows spread evenly over
  each package's validation stream, the packages interleaved.

  Returns:
    ``(windows, labels)`` of shapes ``[num_batches, batch_size, seq_len]``
    and ``[num_batches, batch_size]``.
  """
  count = num_batches * batch_size
  per_class = -(-count // len(streams))
  windows, labels = [], []
  for c, stream in enumerate(streams):
    last = stream.shape[0] - seq_len
    if last <= 0:
      raise ValueError("A validation stream is shorter than one window.")
    starts = np.linspace(0, last, per_class).astype(np.int64)
    windows.append(stream[starts[:, None] + np.arange(seq_len)])
    labels.append(np.full(per_class, c))
  x = np.stack(windows, 1).reshape(-1, seq_len)[:count].astype(np.int32)
  y = np.stack(labels, 1).reshape(-1)[:count].astype(np.int32)
  return (x.reshape(num_batches, batch_size, seq_len),
          y.reshape(num_batches, batch_size))


def _rng(seed: int, step: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(stream), int(step)])


def lm_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """One language-modelling batch: random windows of the token stream.

  Args:
    tokens: a 1-D ``uint8`` token stream (e.g. ``corpus.train``).
    step: the training step; with ``seed`` it fixes the batch.
    batch_size: windows per batch.
    seq_len: tokens per window (the model's context).
    seed: the data seed.

  Returns:
    ``(inputs, targets)``, two ``int32`` arrays ``[batch_size, seq_len]``,
    ``targets`` being ``inputs`` shifted by one token.
  """
  n = tokens.shape[0] - seq_len - 1
  if n <= 0:
    raise ValueError(
        f"The token stream ({tokens.shape[0]} tokens) is shorter than one "
        f"window of {seq_len + 1}.")
  starts = _rng(seed, step, 0).integers(0, n, size=batch_size)
  windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return windows[:, :-1], windows[:, 1:]


def lm_batches(tokens: np.ndarray, start_step: int, num_steps: int,
               batch_size: int, seq_len: int, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
  """``num_steps`` consecutive batches of :func:`lm_batch`, stacked.

  Returns:
    ``(inputs, targets)`` of shape ``[num_steps, batch_size, seq_len]``.
  """
  pairs = [lm_batch(tokens, s, batch_size, seq_len, seed)
           for s in range(start_step, start_step + num_steps)]
  return (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


def lm_eval_batches(tokens: np.ndarray, num_batches: int, batch_size: int,
                    seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Fixed evaluation batches: windows spread evenly over ``tokens``.

  Returns:
    ``(inputs, targets)`` of shape ``[num_batches, batch_size, seq_len]``,
    the same for every call with the same arguments.
  """
  count = num_batches * batch_size
  last = tokens.shape[0] - seq_len - 1
  if last <= 0:
    raise ValueError("The validation stream is shorter than one window.")
  starts = np.linspace(0, last, count).astype(np.int64)
  windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  windows = windows.reshape(num_batches, batch_size, seq_len + 1)
  return windows[..., :-1], windows[..., 1:]


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """Images and labels split into training and validation sets.

  Attributes:
    x_train: ``float32`` images ``[n, height, width, channels]`` in ``[0, 1]``.
    y_train: ``int32`` labels ``[n]``.
    x_val: validation images.
    y_val: validation labels.
    num_classes: number of classes.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  num_classes: int


@functools.lru_cache(maxsize=4)
def digits_dataset(val_fraction: float = 0.2, split_seed: int = 0
                   ) -> ImageDataset:
  """The 8x8 digits of scikit-learn, split and scaled to ``[0, 1]``.

  Args:
    val_fraction: share of the images held out, stratified by class.
    split_seed: seed of the split (fixed by default, so that the validation
      set does not move with the training seed).

  Returns:
    An :class:`ImageDataset` with images ``[n, 8, 8, 1]``.

  Example:
    >>> from microadam_compare import data
    >>> ds = data.digits_dataset()
    >>> ds.x_train.shape, ds.x_val.shape, ds.num_classes
    ((1438, 8, 8, 1), (359, 8, 8, 1), 10)
  """
  # Imported here: scikit-learn is slow to import and only this loader needs it.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  digits = datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(split_seed)
  val_idx = []
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    rng.shuffle(idx)
    val_idx.append(idx[:int(round(len(idx) * val_fraction))])
  val_mask = np.zeros(len(y), bool)
  val_mask[np.concatenate(val_idx)] = True
  return ImageDataset(x_train=x[~val_mask], y_train=y[~val_mask],
                      x_val=x[val_mask], y_val=y[val_mask], num_classes=10)


def image_batches(dataset: ImageDataset, start_step: int, num_steps: int,
                  batch_size: int, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
  """``num_steps`` training batches drawn with replacement, stacked.

  Batch ``s`` is a pure function of ``(seed, s)``.

  Returns:
    ``(images, labels)`` of shapes ``[num_steps, batch_size, ...]``.
  """
  idx = np.stack([
      _rng(seed, s, 1).integers(0, dataset.x_train.shape[0], size=batch_size)
      for s in range(start_step, start_step + num_steps)])
  return dataset.x_train[idx], dataset.y_train[idx]
