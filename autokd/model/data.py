"""Datasets as in-memory tensors, fixed splits, and exactly replayable training views.

Every dataset is loaded once into float32 tensors (normalized with the training split's per-channel mean/std)
so that batching is plain indexing on the target device. Built-in names: ``digits`` (scikit-learn, no
download), ``mnist`` and ``fashion-mnist`` (their IDX files, gzipped or not, read directly: see
:func:`find_idx_files`), ``cifar10``, ``cifar100`` (torchvision files in ``data_dir``) and ``folder:PATH`` (an
image folder with ``train/``, ``val/`` and optional ``test/`` subfolders of class dirs).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from autokd.errors import UserError, close_matches

# Bump when the preprocessing changes, so cached teachers/outputs keyed on DataSplits.fingerprint are rebuilt.
PREPROCESSING_VERSION = 1
DEFAULT_DATA_DIR = "~/.cache/autokd/data"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

_TORCHVISION = {  # name -> (torchvision class name, default input size, validation fraction of train)
    "cifar10": ("CIFAR10", 32, 0.1),
    "cifar100": ("CIFAR100", 32, 0.1),
    "mnist": ("MNIST", 28, 0.1),
    "fashion-mnist": ("FashionMNIST", 28, 0.1),
}
# MNIST-format sets are read from their IDX files (the format their authors publish) wherever they are found:
# a folder of the four files, torchvision's layout below a data dir, or a system package's folder.
_IDX_SETS = {  # name -> (torchvision folder name, folders a system package installs the files to, class names)
    "mnist": ("MNIST", (), ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six",
                           "7 - seven", "8 - eight", "9 - nine"]),
    "fashion-mnist": ("FashionMNIST", ("/usr/share/datasets/fashion-mnist",),  # Debian: dataset-fashion-mnist
                      ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot"]),
}
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_DEFAULT_INPUT_SIZE = {"digits": 32, **{k: v[1] for k, v in _TORCHVISION.items()}, "folder": 32}


@dataclass
class DataSplits:
    """Train/val/test tensors of one dataset, plus what a model needs to know about them."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    in_chans: int
    input_size: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: str | torch.device) -> DataSplits:
        """Copy of the splits with every tensor on ``device`` (same fingerprint)."""
        return replace(self, **{k: getattr(self, k).to(device) for k in
                                ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")})


def available_datasets() -> list[str]:
    """Built-in dataset names; ``folder:PATH`` is accepted as well."""
    return ["digits", *_TORCHVISION]


def load_dataset(name: str = "digits", data_dir: str | None = None, input_size: int | None = None,
                 seed: int = 0, download: bool = False, train_limit: int | None = None) -> DataSplits:
    """Load ``name`` into memory with a fixed stratified split derived from ``seed``.

    digits: 60/20/20 train/val/test. torchvision sets: 10% of the official train set is the validation split,
    the official test set is the test split; files are read from ``data_dir`` (default ``$AUTOKD_DATA_DIR`` or
    ``~/.cache/autokd/data``) and downloaded only when ``download``. ``folder:PATH``: ``train/`` and ``val/``,
    plus ``test/`` when present, else half of ``val/`` (stratified) becomes the test split.
    ``train_limit`` keeps a stratified, deterministic subset of the training split (val/test keep their
    images; normalization statistics always come from the training images actually used).
    """
    key = name.strip().lower() if not name.startswith("folder:") else "folder"
    name = name if key == "folder" else key
    if key not in _DEFAULT_INPUT_SIZE:
        valid = available_datasets() + ["folder:PATH"]
        close = close_matches(key, valid, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown dataset {name!r}.{hint} Valid: {', '.join(valid)}.")
    if input_size is None:
        input_size = _DEFAULT_INPUT_SIZE[key]
    if input_size < 4:
        raise UserError(f"input_size must be at least 4, got {input_size}.")
    if train_limit is not None and train_limit < 1:
        raise UserError(f"train_limit must be positive, got {train_limit}.")

    extra: dict = {}
    if key == "digits":
        x_tr, y_tr, x_va, y_va, x_te, y_te, classes = _load_digits(seed)
    elif key == "folder":
        x_tr, y_tr, x_va, y_va, x_te, y_te, classes, extra = _load_folder(name[len("folder:"):], input_size, seed)
    elif key in _IDX_SETS:
        x_tr, y_tr, x_va, y_va, x_te, y_te, classes = _load_idx_set(key, data_dir, seed, download)
    else:
        x_tr, y_tr, x_va, y_va, x_te, y_te, classes = _load_torchvision(key, data_dir, seed, download)

    if train_limit is not None and train_limit < len(y_tr):
        keep = _stratified_subset(y_tr.numpy(), train_limit, seed)
        x_tr, y_tr = x_tr[keep], y_tr[keep]

    # Statistics come from the (possibly limited) training split only: nothing leaks from val/test.
    x_tr, x_va, x_te = (_resize(x, input_size) for x in (x_tr, x_va, x_te))
    mean = x_tr.mean(dim=(0, 2, 3))
    std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-6)
    x_tr, x_va, x_te = (((x - mean[:, None, None]) / std[:, None, None]).contiguous() for x in (x_tr, x_va, x_te))

    ident = {"name": name, "seed": seed, "input_size": input_size, "train_limit": train_limit,
             "preprocessing": PREPROCESSING_VERSION, "sizes": [len(y_tr), len(y_va), len(y_te)],
             "classes": classes, **extra}
    return DataSplits(
        name=name, x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va, x_test=x_te, y_test=y_te,
        num_classes=len(classes), in_chans=x_tr.shape[1], input_size=input_size, class_names=classes,
        mean=tuple(mean.tolist()), std=tuple(std.tolist()), fingerprint=fingerprint_of(ident))


def fingerprint_of(obj: object) -> str:
    """SHA-1 hex of ``obj``'s canonical JSON: the fingerprints of data, training views and caches."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (keep, held_out) index arrays; falls back to a plain split when a class is too small."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    counts = np.bincount(y)
    n_out = max(1, round(fraction * len(y)))
    n_classes = (counts > 0).sum()
    stratify = y if counts[counts > 0].min() >= 2 and min(n_out, len(y) - n_out) >= n_classes else None
    keep, out = train_test_split(idx, test_size=n_out, stratify=stratify, random_state=seed)
    return np.sort(keep), np.sort(out)


def _stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    keep, _ = _split(y, 1.0 - n / len(y), seed)
    return keep


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    # Chunked so that large sets (CIFAR at a bigger input size) do not need two full copies at once.
    return torch.cat([F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
                      for c in x.split(4096)])


def _load_digits(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    rest, test = _split(y, 0.2, seed)  # 60/20/20
    train, val = _split(y[rest], 0.25, seed)
    train, val = rest[train], rest[val]
    t = torch.from_numpy(y)
    return x[train], t[train], x[val], t[val], x[test], t[test], [str(c) for c in d.target_names]


def _load_torchvision(key: str, data_dir: str | None, seed: int, download: bool):
    import torchvision.datasets as tvd

    cls_name, _, val_fraction = _TORCHVISION[key]
    root = _data_root(data_dir)
    cls = getattr(tvd, cls_name)
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        how = ("the download failed (no network?); place the files there yourself"
               if download else "pass --download to fetch them, or place the torchvision files there")
        raise UserError(f"dataset {key!r}: files not found in {root} ({e}); {how}.") from None
    except OSError as e:
        raise UserError(f"dataset {key!r}: cannot read or download into {root}: {e}") from None

    def to_tensors(ds) -> tuple[Tensor, Tensor]:
        x = torch.as_tensor(np.asarray(ds.data))
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # HWC uint8 -> CHW
        return x.float().div_(255.0), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

    x, y = to_tensors(train)
    x_te, y_te = to_tensors(test)
    keep, val = _split(y.numpy(), val_fraction, seed)
    keep, val = torch.from_numpy(keep), torch.from_numpy(val)
    return x[keep], y[keep], x[val], y[val], x_te, y_te, list(train.classes)


def _data_root(data_dir: str | None) -> Path:
    return Path(os.path.expanduser(data_dir or os.environ.get("AUTOKD_DATA_DIR", DEFAULT_DATA_DIR)))


def idx_folders(key: str, data_dir: str | None) -> list[Path]:
    """Where the IDX files of ``key`` are looked for, in order: ``data_dir`` itself and its torchvision layout
    (``DIR/FashionMNIST/raw``) when given; else the system package's folder, then the default data dir (both
    layouts)."""
    tv_name, system, _ = _IDX_SETS[key]
    if data_dir:
        root = Path(os.path.expanduser(data_dir))
        return [root, root / tv_name / "raw"]
    root = _data_root(None)
    return [*(Path(p) for p in system), root, root / tv_name / "raw"]


def find_idx_files(key: str, data_dir: str | None) -> dict[str, Path] | None:
    """The four IDX files of ``key`` (``train-images``, ``train-labels``, ``t10k-images``, ``t10k-labels``; each
    gzipped or not) from the first folder of :func:`idx_folders` that holds all four, or None."""
    for folder in idx_folders(key, data_dir):
        found = {}
        for stem in (*_IDX_FILES["train"], *_IDX_FILES["test"]):
            path = next((folder / f"{stem}{ext}" for ext in (".gz", "") if (folder / f"{stem}{ext}").is_file()), None)
            if path is None:
                break
            found[stem] = path
        else:
            return found
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format: magic 0x0000_08_<ndim>, big-endian int32 sizes, then
    the data) as a uint8 array of its shape; gzipped files are read through gzip. A file that is not one is a
    UserError naming it."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: cannot read the IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise UserError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex() or 'missing'}, "
                        "expected 000008 then the number of dimensions)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    body = raw[4 + 4 * ndim:]
    if len(body) != size:
        raise UserError(f"{path}: the header declares {shape} ({size} bytes) but the file holds {len(body)}: "
                        "truncated or corrupt; get the file again")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _idx_split(files: dict[str, Path], split: str) -> tuple[Tensor, Tensor]:
    images, labels = (read_idx(files[stem]) for stem in _IDX_FILES[split])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{files[_IDX_FILES[split][0]]}: {len(images)} images of shape {images.shape[1:]} and "
                        f"{len(labels)} labels: expected N 2-D images and N labels")
    x = torch.from_numpy(images.copy())[:, None].float().div_(255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_idx_set(key: str, data_dir: str | None, seed: int, download: bool):
    """MNIST-format sets from their IDX files; with ``download`` and no files, torchvision fetches them."""
    files = find_idx_files(key, data_dir)
    if files is None and download:
        _load_torchvision(key, data_dir, seed, download=True)  # fetches into DIR/<Name>/raw, then read as IDX
        files = find_idx_files(key, data_dir or str(_data_root(None)))
    if files is None:
        looked = ", ".join(str(p) for p in idx_folders(key, data_dir))
        names = ", ".join(f"{stem}.gz" for stem in (*_IDX_FILES["train"], *_IDX_FILES["test"]))
        system = _IDX_SETS[key][1]
        package = (f"install Debian's package (`apt-get install dataset-{key}`, files in {system[0]}), "
                   if system else "")
        raise UserError(f"dataset {key!r}: its IDX files ({names}; gzipped or not) are not in {looked}. To get them: "
                        f"{package}pass --download to fetch them (needs internet), or give --data-dir DIR holding "
                        f"the four files (in DIR or in DIR/{_IDX_SETS[key][0]}/raw).")
    x, y = _idx_split(files, "train")
    x_te, y_te = _idx_split(files, "test")
    keep, val = _split(y.numpy(), _TORCHVISION[key][2], seed)
    keep, val = torch.from_numpy(keep), torch.from_numpy(val)
    return x[keep], y[keep], x[val], y[val], x_te, y_te, list(_IDX_SETS[key][2])


def _load_folder(path: str, size: int, seed: int):
    """``train/`` and ``val/`` are required; without ``test/``, half of ``val/`` (stratified) becomes test."""
    from PIL import Image, UnidentifiedImageError

    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        raise UserError(f"dataset folder {str(root)!r} does not exist (from 'folder:{path}'); expected "
                        "train/ and val/ subfolders with one directory per class, test/ optional.")
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise UserError(f"dataset folder {str(root)!r} has no {sub}/ subfolder; expected train/ and val/ "
                            "(test/ optional), each with one directory per class.")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{root / 'train'} contains no class directories.")
    subsets = ["train", "val"] + (["test"] if (root / "test").is_dir() else [])

    files: dict[str, list[tuple[Path, int]]] = {}
    for sub in subsets:
        found = sorted(p.name for p in (root / sub).iterdir() if p.is_dir())
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(f"{root / sub} has class directories not in train/: {', '.join(unknown)}.")
        files[sub] = [(f, c) for c, name in enumerate(classes) if (root / sub / name).is_dir()
                      for f in sorted((root / sub / name).iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not files[sub]:
            raise UserError(f"{root / sub} contains no images (extensions: {', '.join(IMAGE_EXTENSIONS)}).")

    def probe_mode(f: Path) -> str:
        try:
            with Image.open(f) as im:
                return im.mode
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"cannot read image {f}: {e}") from None

    gray = all(probe_mode(f) in ("1", "L", "I", "I;16", "F") for f, _ in files["train"][:: max(1, len(files["train"]) // 64)])
    mode = "L" if gray else "RGB"

    def load(items: list[tuple[Path, int]]) -> tuple[Tensor, Tensor]:
        arrays = []
        for f, _ in items:
            try:
                with Image.open(f) as im:
                    im = im.convert(mode).resize((size, size), Image.BILINEAR)
                    arrays.append(np.asarray(im, dtype=np.uint8))
            except (OSError, UnidentifiedImageError) as e:
                raise UserError(f"cannot read image {f}: {e}") from None
        x = torch.from_numpy(np.stack(arrays))
        x = x[:, None] if gray else x.permute(0, 3, 1, 2)
        return x.float().div_(255.0), torch.tensor([c for _, c in items], dtype=torch.int64)

    x_tr, y_tr = load(files["train"])
    x_va, y_va = load(files["val"])
    if "test" in files:
        x_te, y_te = load(files["test"])
    else:
        keep, test = _split(y_va.numpy(), 0.5, seed)
        keep, test = torch.from_numpy(keep), torch.from_numpy(test)
        x_va, y_va, x_te, y_te = x_va[keep], y_va[keep], x_va[test], y_va[test]
    # The listing (relative names and byte sizes) goes into the fingerprint, so edited folders re-key caches.
    listing = [[str(f.relative_to(root)), f.stat().st_size] for sub in subsets for f, _ in files[sub]]
    extra = {"path": str(root.resolve()), "files": fingerprint_of(listing), "mode": mode}
    return x_tr, y_tr, x_va, y_va, x_te, y_te, classes, extra


_P = 2_147_483_647  # Mersenne prime 2^31-1: products of two residues fit in int64 on every device


def _hash(idx: Tensor, salt: int) -> Tensor:
    """Deterministic pseudo-random int64 in [0, 2^31-1) per index; identical on CPU and CUDA."""
    h = (idx.to(torch.int64) + salt) % _P
    for mult, add in ((48271, 11), (69621, 12345), (16807, 2_654_435)):
        h = (h * mult + add) % _P
        h = h ^ (h >> 13)
    return h


class TrainViews:
    """Finite set of exactly replayable training views (FKD-style).

    View 0 is the identity. Views 1..num_views-1 translate each image by up to ``max_shift`` pixels (edges
    replicated) and optionally flip it horizontally; the parameters depend only on (seed, view, image index),
    so a teacher's outputs for every view can be computed once and replayed for any student.
    """

    VERSION = 1

    def __init__(self, num_views: int = 0, seed: int = 0, max_shift: int = 2, hflip: bool = False) -> None:
        if num_views < 0 or max_shift < 0:
            raise ValueError(f"num_views and max_shift must be >= 0, got {num_views} and {max_shift}.")
        self.num_views = num_views
        self.seed = seed
        self.max_shift = max_shift
        self.hflip = hflip
        self.fingerprint = fingerprint_of({"views": num_views, "seed": seed, "shift": max_shift, "hflip": hflip,
                                           "version": self.VERSION})

    def __repr__(self) -> str:
        return (f"TrainViews(num_views={self.num_views}, seed={self.seed}, max_shift={self.max_shift}, "
                f"hflip={self.hflip})")

    @property
    def count(self) -> int:
        """Number of distinct views (1 when augmentation is off)."""
        return max(self.num_views, 1)

    def view_for_epoch(self, epoch: int) -> int:
        """View used in (1-based) ``epoch``: cycles 0, 1, ..., count-1, 0, ..."""
        return (epoch - 1) % self.count

    def params(self, idx: Tensor, view: int) -> tuple[Tensor, Tensor, Tensor]:
        """(dx, dy, flip) of each image index for ``view``."""
        salt = int(hashlib.sha1(f"{self.seed}:{view}".encode()).hexdigest()[:7], 16)
        span = 2 * self.max_shift + 1
        dx = _hash(idx, salt) % span - self.max_shift
        dy = _hash(idx, salt + 1) % span - self.max_shift
        flip = (_hash(idx, salt + 2) % 2 == 1) & self.hflip
        return dx, dy, flip

    def apply(self, x: Tensor, idx: Tensor, view: int) -> Tensor:
        """View ``view`` of the batch ``x`` whose rows are the training images ``idx``."""
        if not 0 <= view < self.count:
            raise ValueError(f"view {view} out of range for {self!r}")
        if view == 0 or (self.max_shift == 0 and not self.hflip):
            return x
        b, _, h, w = x.shape
        dx, dy, flip = self.params(idx.to(x.device), view)
        cols = torch.arange(w, device=x.device).expand(b, w)
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
        cols = (cols - dx[:, None]).clamp(0, w - 1)
        rows = (torch.arange(h, device=x.device).expand(b, h) - dy[:, None]).clamp(0, h - 1)
        batch = torch.arange(b, device=x.device)[:, None, None]
        # One gather for shift + flip; advanced indexing puts the channel dim last.
        return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


