"""Data sets for the Hessian-free experiments, as NumPy arrays.

Nothing here downloads anything: ``curves`` is generated from a seed, ``digits`` ships with
scikit-learn, and ``mnist`` reads files the user already has. The one exception is
``mnist("tfds")``, which lets tensorflow-datasets download MNIST into its own cache once.

Inputs are float32 in :math:`[0, 1]`, one flattened example per row. Targets are int32 class
labels, or the inputs themselves for autoencoders (``autoencoder=True``; ``curves`` has no
labels, so its targets are always its inputs). Batches for :mod:`hfjax` are then
``(dataset.x_train[i:j], dataset.y_train[i:j])``.

Example:

  >>> from hfjax.experiments import datasets
  >>> data = datasets.load("curves", num_train=100, num_test=10)
  >>> data.x_train.shape, data.y_test.dtype
  ((100, 784), dtype('float32'))
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zipfile
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

IMAGE_SIZE = 28

# CURVES generation. Hinton & Salakhutdinov (2006) give the recipe only in words (three random
# points, a smooth curve through them, drawn with a pen of random width); these ranges were
# chosen by eye, for strokes with a saturated core and soft anti-aliased edges.
_CONTROL_RANGE = (2.0, IMAGE_SIZE - 3.0)
_CURVE_BOUNDS = (1.0, IMAGE_SIZE - 2.0)
_MIN_CURVE_LENGTH = 10.0
_CURVE_SAMPLES = 96
_PEN_SIGMA = (0.5, 1.0)
_PEN_GAIN = (1.5, 3.0)

_MNIST_FILES = {
  "x_train": "train-images-idx3-ubyte",
  "y_train": "train-labels-idx1-ubyte",
  "x_test": "t10k-images-idx3-ubyte",
  "y_test": "t10k-labels-idx1-ubyte",
}
_MNIST_FORMS = (
  "mnist() accepts: a Keras 'mnist.npz' file (keys x_train, y_train, x_test, y_test), or a "
  "directory holding it; a directory holding the four IDX files "
  f"({', '.join(_MNIST_FILES.values())}, each optionally gzipped as '.gz'); or the string "
  "'tfds' to load through tensorflow-datasets."
)


class Dataset(NamedTuple):
  """A train/test split held as NumPy arrays.

  Attributes:
    x_train: Training inputs, float32 of shape ``(num_train, num_features)``.
    y_train: Training targets: int32 labels of shape ``(num_train,)``, or the inputs for an
      autoencoder.
    x_test: Test inputs, float32 of shape ``(num_test, num_features)``.
    y_test: Test targets, as ``y_train``.
    name: The name the data set is registered under in :func:`load`.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str


def _make_dataset(
  name: str,
  x_train: np.ndarray,
  y_train: np.ndarray,
  x_test: np.ndarray,
  y_test: np.ndarray,
  autoencoder: bool,
) -> Dataset:
  if autoencoder:
    # The targets share the input arrays rather than copying them: MNIST is 180 MB as float32.
    y_train, y_test = x_train, x_test
  return Dataset(x_train, y_train, x_test, y_test, name)


def _spline_through(control: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Natural cubic spline through three points, at parameters ``t`` in ``[0, 1]``.

  Args:
    control: Control points of shape ``(n, 3, 2)``.
    t: Parameters of shape ``(num_t,)``; 0 and 1 are the first and last control points.

  Returns:
    Points of shape ``(n, num_t, 2)``.
  """
  # Chord-length knots keep the speed along the curve roughly even, so a curve does not loop
  # when two control points are close; the floor only guards against coincident points.
  chords = np.maximum(np.linalg.norm(np.diff(control, axis=1), axis=-1), 1e-6)
  h0, h1 = chords[:, 0, None, None], chords[:, 1, None, None]
  p0, p1, p2 = control[:, 0:1], control[:, 1:2], control[:, 2:3]
  # Natural end conditions leave one unknown second derivative, at the middle knot.
  m1 = 3.0 * ((p2 - p1) / h1 - (p1 - p0) / h0) / (h0 + h1)
  s = t[None, :, None] * (h0 + h1)
  u = h0 - s
  first = m1 * s**3 / (6.0 * h0) + p0 * u / h0 + (p1 / h0 - m1 * h0 / 6.0) * s
  v = s - h0
  w = h1 - v
  second = m1 * w**3 / (6.0 * h1) + (p1 / h1 - m1 * h1 / 6.0) * w + p2 * v / h1
  return np.where(s < h0, first, second)


def _random_control_points(rng: np.random.Generator, n: int) -> np.ndarray:
  """Three random points per curve, shape ``(n, 3, 2)``, in the order the curve visits them."""
  control = rng.uniform(*_CONTROL_RANGE, size=(n, 3, 2))
  # Visit the vertex facing the longest side in the middle, so the curve bends by at most
  # 120 degrees there instead of folding back on itself into a short thick blob.
  opposite = np.linalg.norm(control[:, [1, 2, 0]] - control[:, [2, 0, 1]], axis=-1)
  order = np.array([[1, 0, 2], [0, 1, 2], [0, 2, 1]])[np.argmax(opposite, axis=1)]
  return np.take_along_axis(control, order[..., None], axis=1)


def _random_curves(rng: np.random.Generator, n: int) -> np.ndarray:
  """Points along ``n`` random curves that lie inside the frame, shape ``(n, samples, 2)``."""
  t = np.linspace(0.0, 1.0, _CURVE_SAMPLES + 1)
  control = _random_control_points(rng, n)
  points = _spline_through(control, t)
  while True:
    # Redraw curves that overshoot the frame (a stroke cut by the border can fall apart into
    # pieces) or are too short to be more than a blob.
    length = np.linalg.norm(np.diff(points, axis=1), axis=-1).sum(axis=1)
    bad = (
      (points.min(axis=(1, 2)) < _CURVE_BOUNDS[0])
      | (points.max(axis=(1, 2)) > _CURVE_BOUNDS[1])
      | (length < _MIN_CURVE_LENGTH)
    )
    if not bad.any():
      return points
    control[bad] = _random_control_points(rng, int(bad.sum()))
    points[bad] = _spline_through(control[bad], t)


def _render_curves(rng: np.random.Generator, n: int) -> np.ndarray:
  """Draws ``n`` random curves as flattened float32 images."""
  pixels = IMAGE_SIZE * IMAGE_SIZE
  if n == 0:
    return np.zeros((0, pixels), np.float32)
  points = _random_curves(rng, n)
  sigma = rng.uniform(*_PEN_SIGMA, size=n)
  gain = rng.uniform(*_PEN_GAIN, size=n)

  # Lay ink along the curve at a constant amount per unit length: each piece of the sampled
  # curve puts its length at its midpoint, shared bilinearly between the four nearest pixels.
  ink = np.linalg.norm(np.diff(points, axis=1), axis=-1)
  mid = 0.5 * (points[:, 1:] + points[:, :-1])
  corner = np.floor(mid).astype(np.int64)
  frac = mid - corner
  offset = (np.arange(n) * pixels)[:, None]
  index, weight = [], []
  for dx in (0, 1):
    for dy in (0, 1):
      wx = frac[..., 0] if dx else 1.0 - frac[..., 0]
      wy = frac[..., 1] if dy else 1.0 - frac[..., 1]
      index.append(offset + (corner[..., 1] + dy) * IMAGE_SIZE + corner[..., 0] + dx)
      weight.append(ink * wx * wy)
  image = np.bincount(
    np.concatenate(index, axis=None), np.concatenate(weight, axis=None), minlength=n * pixels
  ).reshape(n, IMAGE_SIZE, IMAGE_SIZE)

  # A Gaussian pen, applied as a separable blur K @ image @ K. Cut at 3 sigma so the
  # background stays exactly zero, and scaled so a straight stroke peaks at `gain`: clipping
  # at 1 then gives a saturated core with anti-aliased edges whose width grows with both.
  grid = np.arange(IMAGE_SIZE)
  gap = (grid[:, None] - grid[None, :])[None]
  scale = sigma[:, None, None]
  kernel = np.exp(-0.5 * (gap / scale) ** 2) * (np.abs(gap) <= 3.0 * scale)
  kernel = kernel.astype(np.float32)
  image = kernel @ image.astype(np.float32) @ kernel
  peak = (gain / (np.sqrt(2.0 * np.pi) * sigma)).astype(np.float32)
  return np.clip(peak[:, None, None] * image, 0.0, 1.0).reshape(n, pixels)


def curves(num_train: int = 20000, num_test: int = 10000, seed: int = 0) -> Dataset:
  """CURVES-style images: one random smooth stroke per 28x28 image.

  Follows the recipe of Hinton & Salakhutdinov (2006) as far as it is published: three
  control points drawn uniformly in the image, a cubic spline through them (here a natural
  spline with chord-length knots, redrawn if it leaves the frame or is shorter than 10
  pixels), drawn with a pen of random width. The pen is a Gaussian of standard deviation
  :math:`\\sigma \\sim U[0.5, 1]` pixels laid uniformly along the curve, scaled by a gain
  :math:`\\sim U[1.5, 3]` and clipped at 1, so strokes are anti-aliased, about 2 to 4 pixels
  wide. The original images were never released with their generator, so these are the same
  kind of data, not the same pixels: errors are comparable in scale, not digit for digit.

  Train and test sets come from independent streams of ``seed``, so the training set does not
  change with ``num_test``. The default 30000 images take a few seconds.

  Args:
    num_train: Number of training images (the paper's 20000 by default).
    num_test: Number of test images (the paper's 10000 by default).
    seed: Seed of the generator; the same seed always gives the same images.

  Returns:
    A :class:`Dataset` named ``"curves"`` with float32 inputs of shape ``(num, 784)`` in
    :math:`[0, 1]`, and targets that are the inputs (it is an autoencoder benchmark).

  Raises:
    ValueError: If ``num_train`` or ``num_test`` is negative.

  References:
    Hinton & Salakhutdinov, `Reducing the dimensionality of data with neural networks
    <https://www.science.org/doi/10.1126/science.1127647>`_, Science 2006.
  """
  if num_train < 0 or num_test < 0:
    raise ValueError(f"num_train and num_test must be >= 0; got {num_train} and {num_test}.")
  train_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
  x_train = _render_curves(np.random.default_rng(train_seed), num_train)
  x_test = _render_curves(np.random.default_rng(test_seed), num_test)
  return _make_dataset("curves", x_train, x_train, x_test, x_test, autoencoder=True)


def digits(seed: int = 0, test_fraction: float = 0.2, *, autoencoder: bool = False) -> Dataset:
  """The 8x8 handwritten digits bundled with scikit-learn (1797 images, 10 classes).

  Small enough to train on in seconds, which makes it the data set for tests and notebooks
  that must run anywhere.

  Args:
    seed: Seed of the train/test split.
    test_fraction: Fraction of the examples held out, stratified by class.
    autoencoder: If true, the targets are the inputs instead of the labels.

  Returns:
    A :class:`Dataset` named ``"digits"`` with float32 inputs of shape ``(num, 64)`` in
    :math:`[0, 1]` and int32 labels in ``0..9`` (or the inputs, for an autoencoder).

  Raises:
    ValueError: If ``test_fraction`` is not strictly between 0 and 1.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}.")
  # scikit-learn is an optional dependency of hfjax (the "examples" extra).
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  raw = load_digits()
  # Pixel values are counts from 0 to 16 (4x4 blocks of a 32x32 bitmap).
  x = (raw.data / 16.0).astype(np.float32)
  y = raw.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    x, y, test_size=test_fraction, random_state=seed, stratify=y
  )
  return _make_dataset("digits", x_train, y_train, x_test, y_test, autoencoder)


def _read_idx(path: pathlib.Path) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (the MNIST format), gzipped or not."""
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  # Header: two zero bytes, a type code (0x08 is unsigned byte), the number of dimensions,
  # then each dimension as a big-endian uint32.
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad header {data[:4]!r}).")
  ndim = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  values = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if values.size != np.prod(shape):
    raise ValueError(f"{path} holds {values.size} values but its header says {shape}.")
  return values.reshape(shape)


def _find_idx(directory: pathlib.Path, stem: str) -> pathlib.Path:
  # Some mirrors spell the files "train-images.idx3-ubyte"; accept both spellings.
  for name in (stem, stem.replace("-idx", ".idx")):
    for candidate in (directory / name, directory / f"{name}.gz"):
      if candidate.is_file():
        return candidate
  raise FileNotFoundError(f"No {stem} (or {stem}.gz) in {str(directory)!r}. {_MNIST_FORMS}")


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  # An .npz is a zip archive; checking first turns NumPy's errors about pickles or .npy files
  # into one that says what mnist() wanted.
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{str(path)!r} is not an .npz file. {_MNIST_FORMS}")
  with np.load(path) as npz:
    missing = [key for key in _MNIST_FILES if key not in npz.files]
    if missing:
      raise ValueError(f"{str(path)!r} lacks the arrays {missing}. {_MNIST_FORMS}")
    return {key: npz[key] for key in _MNIST_FILES}


def _load_tfds() -> dict[str, np.ndarray]:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
      "mnist('tfds') needs tensorflow-datasets (pip install tensorflow-datasets). " + _MNIST_FORMS
    ) from e
  (x_train, y_train), (x_test, y_test) = tfds.as_numpy(
    tfds.load("mnist", split=["train", "test"], batch_size=-1, as_supervised=True)
  )
  return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _unit_images(images: np.ndarray, source: str) -> np.ndarray:
  if images.dtype != np.uint8:
    raise ValueError(f"Expected uint8 images from {source}; got {images.dtype}.")
  return (images.reshape(images.shape[0], -1) / np.float32(255.0)).astype(np.float32)


def mnist(path: str | os.PathLike[str], *, autoencoder: bool = False) -> Dataset:
  """MNIST (60000 training and 10000 test images of digits) from files already on disk.

  Fashion-MNIST and other data sets in the same file formats load the same way.

  Args:
    path: One of: a Keras ``mnist.npz`` file (arrays ``x_train``, ``y_train``, ``x_test``,
      ``y_test``, as ``keras.datasets.mnist`` caches it in ``~/.keras/datasets``); a
      directory holding the four IDX files ``train-images-idx3-ubyte``,
      ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``
      (each optionally gzipped, ``.gz``), or holding ``mnist.npz``; or the string ``"tfds"``
      to load through tensorflow-datasets, which is imported only then and downloads into its
      own cache on first use.
    autoencoder: If true, the targets are the inputs instead of the labels.

  Returns:
    A :class:`Dataset` named ``"mnist"`` with float32 inputs of shape ``(num, 784)`` in
    :math:`[0, 1]` and int32 labels (or the inputs, for an autoencoder).

  Raises:
    FileNotFoundError: If ``path`` does not exist or a directory lacks a file; the message
      names the path and the accepted forms.
    ValueError: If a file is not in the expected format.
    ImportError: If ``path`` is ``"tfds"`` and tensorflow-datasets is not installed.
  """
  if os.fspath(path) == "tfds":
    arrays, source = _load_tfds(), "tensorflow-datasets"
  else:
    location = pathlib.Path(path).expanduser()
    source = repr(str(location))
    if location.is_file():
      arrays = _load_npz(location)
    elif location.is_dir() and not (location / "mnist.npz").is_file():
      arrays = {key: _read_idx(_find_idx(location, stem)) for key, stem in _MNIST_FILES.items()}
    elif location.is_dir():
      arrays = _load_npz(location / "mnist.npz")
    else:
      raise FileNotFoundError(f"No MNIST data at {str(location)!r}. {_MNIST_FORMS}")
  return _make_dataset(
    "mnist",
    _unit_images(arrays["x_train"], source),
    arrays["y_train"].astype(np.int32),
    _unit_images(arrays["x_test"], source),
    arrays["y_test"].astype(np.int32),
    autoencoder,
  )


_LOADERS: dict[str, Callable[..., Dataset]] = {"curves": curves, "digits": digits, "mnist": mnist}


def load(name: str, **kwargs) -> Dataset:
  """Loads a data set by name, for configs and command lines.

  Args:
    name: ``"curves"``, ``"digits"`` or ``"mnist"``.
    **kwargs: Passed to the loader of that name (:func:`curves`, :func:`digits`,
      :func:`mnist`), e.g. ``path`` for MNIST.

  Returns:
    The :class:`Dataset`.

  Raises:
    ValueError: If ``name`` is not a known data set.
  """
  if name not in _LOADERS:
    raise ValueError(f"Unknown dataset {name!r}; known datasets: {', '.join(_LOADERS)}.")
  return _LOADERS[name](**kwargs)
