"""Tests for hfjax.experiments.datasets."""

import gzip
import sys
import types

import numpy as np
import pytest
from scipy import ndimage

from hfjax.experiments import datasets

NUM_TRAIN, NUM_TEST = 300, 100


@pytest.fixture(scope="module")
def curves_data():
  return datasets.curves(NUM_TRAIN, NUM_TEST, seed=0)


def _assert_unit_float(x, num_features):
  assert x.dtype == np.float32
  assert x.ndim == 2 and x.shape[1] == num_features
  assert x.min() >= 0.0 and x.max() <= 1.0


# CURVES


def test_curves_shapes_dtypes_ranges(curves_data):
  assert curves_data.name == "curves"
  assert curves_data.x_train.shape == (NUM_TRAIN, 784)
  assert curves_data.x_test.shape == (NUM_TEST, 784)
  _assert_unit_float(curves_data.x_train, 784)
  _assert_unit_float(curves_data.x_test, 784)
  # An autoencoder benchmark: the targets are the inputs.
  np.testing.assert_array_equal(curves_data.y_train, curves_data.x_train)
  np.testing.assert_array_equal(curves_data.y_test, curves_data.x_test)


def test_curves_deterministic_per_seed(curves_data):
  again = datasets.curves(NUM_TRAIN, NUM_TEST, seed=0)
  np.testing.assert_array_equal(again.x_train, curves_data.x_train)
  np.testing.assert_array_equal(again.x_test, curves_data.x_test)


def test_curves_seeds_differ(curves_data):
  other = datasets.curves(NUM_TRAIN, NUM_TEST, seed=1)
  assert not np.allclose(other.x_train, curves_data.x_train)
  assert not np.allclose(other.x_test, curves_data.x_test)
  # Train and test come from independent streams, so they differ too.
  assert not np.allclose(curves_data.x_train[:NUM_TEST], curves_data.x_test)


def test_curves_train_set_does_not_depend_on_test_size(curves_data):
  np.testing.assert_array_equal(datasets.curves(NUM_TRAIN, 7).x_train, curves_data.x_train)


def test_curves_images_are_single_strokes(curves_data):
  images = np.concatenate([curves_data.x_train, curves_data.x_test]).reshape(-1, 28, 28)
  means = images.mean(axis=(1, 2))
  assert np.all((means > 0.01) & (means < 0.3)), (means.min(), means.max())
  assert 0.04 < means.mean() < 0.15
  # Every stroke has a saturated core and an anti-aliased edge.
  assert np.all(images.max(axis=(1, 2)) == 1.0)
  assert np.all(((images > 0.0) & (images < 1.0)).sum(axis=(1, 2)) >= 10)
  # The ink forms one piece, both its faint halo and its bright core.
  eight_connected = np.ones((3, 3), bool)
  for threshold in (0.0, 0.5):
    for image in images:
      _, num_pieces = ndimage.label(image > threshold, structure=eight_connected)
      assert num_pieces == 1
  # Strokes are curves, not blobs or fills: a few dozen pixels of ink out of 784.
  core = (images > 0.5).sum(axis=(1, 2))
  assert np.all((core >= 12) & (core <= 250)), (core.min(), core.max())


def test_curves_empty_and_invalid_sizes():
  data = datasets.curves(0, 2)
  assert data.x_train.shape == (0, 784) and data.x_test.shape == (2, 784)
  with pytest.raises(ValueError, match="num_train"):
    datasets.curves(-1, 2)


# Digits


def test_digits_shapes_dtypes_ranges():
  data = datasets.digits(seed=0, test_fraction=0.2)
  assert data.name == "digits"
  assert len(data.x_train) + len(data.x_test) == 1797
  assert len(data.x_test) == pytest.approx(0.2 * 1797, abs=1)
  _assert_unit_float(data.x_train, 64)
  _assert_unit_float(data.x_test, 64)
  assert data.x_train.max() == 1.0
  for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
    assert y.dtype == np.int32 and y.shape == (len(x),)
  # Stratified: every class appears in both splits in proportion.
  np.testing.assert_allclose(np.bincount(data.y_test) / len(data.y_test), 0.1, atol=0.01)


def test_digits_deterministic_and_seeded():
  first, again, other = (datasets.digits(seed=s) for s in (0, 0, 1))
  for a, b in zip(first[:4], again[:4], strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first.y_train, other.y_train)


def test_digits_autoencoder_targets():
  data = datasets.digits(autoencoder=True)
  assert data.y_train is data.x_train and data.y_test is data.x_test


def test_digits_invalid_fraction():
  with pytest.raises(ValueError, match="test_fraction"):
    datasets.digits(test_fraction=1.0)


# MNIST from files


def _fake_mnist(num_train=5, num_test=3):
  rng = np.random.default_rng(0)
  return {
    "x_train": rng.integers(0, 256, size=(num_train, 28, 28), dtype=np.uint8),
    "y_train": rng.integers(0, 10, size=num_train, dtype=np.uint8),
    "x_test": rng.integers(0, 256, size=(num_test, 28, 28), dtype=np.uint8),
    "y_test": rng.integers(0, 10, size=num_test, dtype=np.uint8),
  }


def _idx_bytes(array):
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.astype(np.uint8).tobytes()


def _write_idx_dir(directory, arrays, gz, dotted=False):
  for key, stem in datasets._MNIST_FILES.items():
    name = stem.replace("-idx", ".idx") if dotted else stem
    if gz:
      (directory / f"{name}.gz").write_bytes(gzip.compress(_idx_bytes(arrays[key])))
    else:
      (directory / name).write_bytes(_idx_bytes(arrays[key]))


def _assert_matches(data, arrays):
  assert data.name == "mnist"
  for split in ("train", "test"):
    x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    raw = arrays[f"x_{split}"]
    _assert_unit_float(x, 784)
    np.testing.assert_allclose(x, raw.reshape(len(raw), -1) / 255.0, rtol=1e-6)
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, arrays[f"y_{split}"])


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dotted", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz, dotted):
  arrays = _fake_mnist()
  _write_idx_dir(tmp_path, arrays, gz, dotted)
  _assert_matches(datasets.mnist(tmp_path), arrays)
  _assert_matches(datasets.mnist(str(tmp_path)), arrays)


def test_mnist_npz_round_trip(tmp_path):
  arrays = _fake_mnist()
  np.savez(tmp_path / "mnist.npz", **arrays)
  _assert_matches(datasets.mnist(tmp_path / "mnist.npz"), arrays)
  # A directory holding the Keras file, like ~/.keras/datasets, works as well.
  _assert_matches(datasets.mnist(tmp_path), arrays)


def test_mnist_autoencoder_targets(tmp_path):
  np.savez(tmp_path / "mnist.npz", **_fake_mnist())
  data = datasets.load("mnist", path=tmp_path / "mnist.npz", autoencoder=True)
  assert data.y_train is data.x_train and data.y_test is data.x_test


def test_mnist_missing_path_names_path_and_forms(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as info:
    datasets.mnist(missing)
  message = str(info.value)
  assert str(missing) in message
  for form in ("mnist.npz", "train-images-idx3-ubyte", ".gz", "tfds"):
    assert form in message


def test_mnist_directory_missing_a_file(tmp_path):
  _write_idx_dir(tmp_path, _fake_mnist(), gz=True)
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
    datasets.mnist(tmp_path)


def test_mnist_bad_files(tmp_path):
  arrays = _fake_mnist()
  _write_idx_dir(tmp_path, arrays, gz=False)
  images = tmp_path / "train-images-idx3-ubyte"
  images.write_bytes(_idx_bytes(arrays["x_train"])[:-5])
  with pytest.raises(ValueError, match="header says"):
    datasets.mnist(tmp_path)
  images.write_bytes(b"\x00\x00\x0d\x03" + _idx_bytes(arrays["x_train"])[4:])
  with pytest.raises(ValueError, match="not an IDX file"):
    datasets.mnist(tmp_path)

  with pytest.raises(ValueError, match="not an .npz file"):
    datasets.mnist(tmp_path / "t10k-images-idx3-ubyte")
  npz = tmp_path / "partial.npz"
  np.savez(npz, x_train=arrays["x_train"], y_train=arrays["y_train"])
  with pytest.raises(ValueError, match="x_test"):
    datasets.mnist(npz)
  np.savez(npz, **{**arrays, "x_train": arrays["x_train"] / 255.0})
  with pytest.raises(ValueError, match="uint8"):
    datasets.mnist(npz)


def test_mnist_tfds_missing(monkeypatch):
  # A None entry in sys.modules makes the import fail whether or not the package is installed.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="tensorflow-datasets"):
    datasets.mnist("tfds")


def test_mnist_tfds_with_a_stand_in(monkeypatch):
  arrays = _fake_mnist()
  calls = []

  def load(name, split, batch_size, as_supervised):
    calls.append((name, tuple(split), batch_size, as_supervised))
    # tensorflow-datasets gives images with a trailing channel axis.
    return [(arrays[f"x_{s}"][..., None], arrays[f"y_{s}"].astype(np.int64)) for s in split]

  fake = types.ModuleType("tensorflow_datasets")
  fake.load = load
  fake.as_numpy = lambda tree: tree
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  _assert_matches(datasets.mnist("tfds"), arrays)
  assert calls == [("mnist", ("train", "test"), -1, True)]


# Registry


def test_load_dispatches_by_name():
  data = datasets.load("curves", num_train=3, num_test=2, seed=4)
  np.testing.assert_array_equal(data.x_train, datasets.curves(3, 2, seed=4).x_train)
  assert datasets.load("digits", seed=2).name == "digits"


def test_load_unknown_name():
  with pytest.raises(ValueError, match="'cifar'.*curves, digits, mnist"):
    datasets.load("cifar")
