from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from autokd.errors import UserError
from autokd.model.data import TrainViews, available_datasets, load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_and_normalization(digits) -> None:
    d = digits
    assert d.x_train.shape == (1078, 1, 32, 32) and d.x_train.dtype == torch.float32
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 1797
    assert d.x_val.shape[1:] == d.x_test.shape[1:] == (1, 32, 32)
    assert d.y_train.dtype == torch.int64
    assert (d.num_classes, d.in_chans, d.input_size) == (10, 1, 32)
    assert d.class_names == [str(i) for i in range(10)]
    assert abs(d.x_train.mean().item()) < 1e-4 and abs(d.x_train.std().item() - 1) < 1e-3
    assert abs(d.x_val.mean().item()) < 0.1  # same statistics applied to val
    assert len(d.fingerprint) == 40
    assert "digits" in available_datasets()


def test_splits_stratified(digits) -> None:
    for y, n in ((digits.y_train, 1078), (digits.y_val, 360), (digits.y_test, 359)):
        counts = torch.bincount(y, minlength=10).float()
        assert (counts - n / 10).abs().max() <= 4


def test_split_deterministic_for_seed(digits) -> None:
    again = load_dataset("digits")
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    assert again.fingerprint == digits.fingerprint
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.y_train, digits.y_train)
    assert other.fingerprint != digits.fingerprint


def test_input_size_and_train_limit() -> None:
    d = load_dataset("digits", input_size=16, train_limit=50)
    assert d.x_train.shape == (50, 1, 16, 16) and d.x_val.shape[-1] == 16
    assert torch.bincount(d.y_train, minlength=10).tolist() == [5] * 10  # stratified
    again = load_dataset("digits", input_size=16, train_limit=50)
    assert torch.equal(d.x_train, again.x_train) and d.fingerprint == again.fingerprint
    assert d.fingerprint != load_dataset("digits", input_size=16, train_limit=60).fingerprint
    assert d.fingerprint != load_dataset("digits", input_size=20, train_limit=50).fingerprint


def test_to_keeps_fingerprint(digits) -> None:
    moved = digits.to("cpu")
    assert moved.fingerprint == digits.fingerprint and moved.x_train.device.type == "cpu"


def test_unknown_dataset_suggests_close_name() -> None:
    with pytest.raises(UserError, match="digits") as e:
        load_dataset("digit")
    assert "cifar10" in str(e.value)  # lists the valid names
    with pytest.raises(UserError, match="cifar10"):
        load_dataset("cifar-10")


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_torchvision_files(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError) as e:
        load_dataset(name, data_dir=str(tmp_path))
    assert str(tmp_path) in str(e.value) and "--download" in str(e.value)


def test_torchvision_mnist_from_local_files(tmp_path: Path) -> None:
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, n, 28, 28) + rng.integers(0, 256, n * 28 * 28, dtype=np.uint8).tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, n) + (np.arange(n) % 10).astype(np.uint8).tobytes())
    d = load_dataset("MNIST", data_dir=str(tmp_path))
    assert d.name == "mnist" and d.input_size == 28 and d.in_chans == 1 and d.num_classes == 10
    assert d.x_train.shape == (54, 1, 28, 28) and len(d.y_val) == 6 and len(d.y_test) == 20
    assert abs(d.x_train.mean().item()) < 1e-4 and abs(d.x_train.std().item() - 1) < 1e-3
    assert load_dataset("mnist", data_dir=str(tmp_path), input_size=32).x_test.shape == (20, 1, 32, 32)


def _write_folder(root: Path, subsets: dict[str, int], mode: str = "RGB") -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub, per_class in subsets.items():
        for cls in ("cat", "dog"):
            (root / sub / cls).mkdir(parents=True)
            for i in range(per_class):
                shape = (10, 12, 3) if mode == "RGB" else (10, 12)
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / sub / cls / f"{i}.png")


def test_image_folder(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"train": 4, "val": 2, "test": 2})
    d = load_dataset(f"folder:{tmp_path}", input_size=8)
    assert d.x_train.shape == (8, 3, 8, 8) and d.x_val.shape == (4, 3, 8, 8) and d.x_test.shape == (4, 3, 8, 8)
    assert d.class_names == ["cat", "dog"] and d.num_classes == 2 and d.in_chans == 3
    assert d.fingerprint == load_dataset(f"folder:{tmp_path}", input_size=8).fingerprint


def test_image_folder_without_test_splits_val(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"train": 3, "val": 4}, mode="L")
    d = load_dataset(f"folder:{tmp_path}")
    assert d.in_chans == 1 and d.input_size == 32
    assert len(d.y_val) == 4 and len(d.y_test) == 4  # half of val/, stratified
    assert torch.bincount(d.y_test).tolist() == [2, 2]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    _write_folder(tmp_path, {"train": 2})
    with pytest.raises(UserError, match="val/"):
        load_dataset(f"folder:{tmp_path}")


def test_views_replay_exactly(digits) -> None:
    views = TrainViews(num_views=4, seed=3, max_shift=2, hflip=True)
    idx = torch.arange(40, 80)
    x = digits.x_train[idx]
    a = views.apply(x, idx, 2)
    assert torch.equal(a, views.apply(x.clone(), idx.clone(), 2))
    # The view of an image depends on its index, not on the batch it lands in.
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))
    assert torch.equal(views.apply(x[perm], idx[perm], 2), a[perm])
    assert torch.equal(views.apply(x, idx, 0), x)
    assert not torch.equal(views.apply(x, idx, 1), a) and not torch.equal(a, x)
    assert a.shape == x.shape and a.is_contiguous()
    # Same parameters from a fresh object with the same settings; different for another seed.
    assert torch.equal(TrainViews(4, seed=3, max_shift=2, hflip=True).apply(x, idx, 2), a)
    assert not torch.equal(TrainViews(4, seed=4, max_shift=2, hflip=True).apply(x, idx, 2), a)


def test_views_shift_is_a_translation() -> None:
    views = TrainViews(num_views=2, seed=0, max_shift=3)
    x = torch.arange(64.0).reshape(1, 1, 8, 8).repeat(16, 1, 1, 1)
    idx = torch.arange(16)
    dx, dy, flip = views.params(idx, 1)
    assert dx.abs().max() <= 3 and dy.abs().max() <= 3 and not flip.any()
    out = views.apply(x, idx, 1)
    for i in range(16):
        rows = (torch.arange(8) - dy[i]).clamp(0, 7)
        cols = (torch.arange(8) - dx[i]).clamp(0, 7)
        assert torch.equal(out[i, 0], x[i, 0][rows][:, cols])


def test_views_epochs_and_fingerprint() -> None:
    views = TrainViews(num_views=3)
    assert [views.view_for_epoch(e) for e in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]
    assert [TrainViews(0).view_for_epoch(e) for e in (1, 2, 3)] == [0, 0, 0]
    assert views.fingerprint == TrainViews(num_views=3).fingerprint
    assert views.fingerprint != TrainViews(num_views=3, hflip=True).fingerprint
    with pytest.raises(ValueError):
        views.apply(torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long), 3)


def _write_idx(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True) -> None:
    """The four MNIST-format IDX files (random pixels, labels cycling through 10 classes)."""
    import gzip
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files = {f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 0x803, n, 28, 28)
                 + rng.integers(0, 256, n * 28 * 28, dtype=np.uint8).tobytes(),
                 f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 0x801, n) + (np.arange(n) % 10).astype(np.uint8).tobytes()}
        for name, blob in files.items():
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_reads_gzipped_idx_files_in_either_layout(tmp_path: Path, layout: str) -> None:
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    _write_idx(folder, gz=True)
    d = load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert d.name == "fashion-mnist" and (d.num_classes, d.in_chans, d.input_size) == (10, 1, 28)
    assert d.x_train.shape == (54, 1, 28, 28) and len(d.y_val) == 6 and len(d.y_test) == 20
    assert d.class_names[0] == "T-shirt/top" and d.class_names[-1] == "Ankle boot"


def test_idx_files_give_the_same_data_as_torchvision(tmp_path: Path) -> None:
    # Plain IDX files in torchvision's layout: our reader and torchvision's must see the same tensors, so that a
    # study's data fingerprint does not depend on which one read them.
    from autokd.model import data as data_module

    _write_idx(tmp_path / "FashionMNIST" / "raw", gz=False)
    ours = data_module._load_idx_set("fashion-mnist", str(tmp_path), seed=0, download=False)
    theirs = data_module._load_torchvision("fashion-mnist", str(tmp_path), seed=0, download=False)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_missing_fashion_mnist_names_the_package_and_download(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    text = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in text and "--download" in text and "nowhere" in text
    assert "train-images-idx3-ubyte.gz" in text


def test_default_fashion_mnist_location_is_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from autokd.model.data import idx_folders

    monkeypatch.setenv("AUTOKD_DATA_DIR", "/tmp/autokd-data")
    assert idx_folders("fashion-mnist", None)[0] == Path("/usr/share/datasets/fashion-mnist")
    assert Path("/tmp/autokd-data/FashionMNIST/raw") in idx_folders("fashion-mnist", None)
    assert idx_folders("fashion-mnist", "/d") == [Path("/d"), Path("/d/FashionMNIST/raw")]  # --data-dir only


@pytest.mark.parametrize("damage", ["magic", "truncated", "not-gzip"])
def test_a_corrupt_idx_file_is_a_user_error_naming_it(tmp_path: Path, damage: str) -> None:
    _write_idx(tmp_path, gz=damage == "not-gzip")
    name = "train-images-idx3-ubyte" + (".gz" if damage == "not-gzip" else "")
    path = tmp_path / name
    blob = path.read_bytes()
    path.write_bytes({"magic": b"\x12\x34" + blob[2:], "truncated": blob[:-100], "not-gzip": b"plain bytes"}[damage])
    with pytest.raises(UserError, match=name):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_from_the_debian_package() -> None:
    d = load_dataset("fashion-mnist", train_limit=1000)
    assert len(d.y_train) == 1000 and len(d.y_val) == 6000 and len(d.y_test) == 10000
    assert torch.bincount(d.y_test).tolist() == [1000] * 10  # the official test split: 1,000 images per class
    assert torch.bincount(d.y_train).tolist() == [100] * 10  # the stratified subset
