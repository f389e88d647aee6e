"""The teacher: trained once per (dataset, architecture, recipe) and cached on disk, or loaded from a checkpoint;
and its outputs for every training view, computed once and shared by every trial and worker process.

Cache files are written to a temporary name in the same directory and renamed, so a reader never sees half a
file; a file lock per entry lets one process train or compute while the others wait.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from autokd.errors import UserError, close_matches
from autokd.model.checkpoint import atomic_save_tensors, atomic_write_json, load_weights, read_weights
from autokd.model.data import DataSplits, TrainViews, fingerprint_of
from autokd.model.train import TeacherSource
from autokd.utils.atomic import atomic_path, file_digest
from autokd.utils.locks import file_lock

# digits: resnet10t with the digits recipe was accurate and quick to train on a small CPU across seeds and
# learning rates, where cheaper timm nets (regnetx_002/004, lcnet_100) stayed clearly less accurate at equal
# CPU time (docs/search-spaces.md, "The teacher"). Fashion-MNIST: resnet10t with flips and shifts, chosen by
# measurement against the time budget of a CPU (docs/real-data.md); resnet18 was over it. The defaults for the
# other datasets follow common practice, not measurement.
DEFAULT_TEACHERS: dict[str, str] = {
    "digits": "resnet10t",
    "mnist": "resnet10t",
    "fashion-mnist": "resnet10t",
    "cifar10": "resnet18",
    "cifar100": "resnet18",
}
FALLBACK_TEACHER = "resnet18"  # image folders
OUTPUTS_VERSION = 1
MAX_FEATURE_BYTES = 512 * 2**20

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherRecipe:
    """How a teacher is trained (cross-entropy, cosine LR); part of the teacher cache key."""

    epochs: int = 4
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 5e-4
    optimizer: str = "adamw"
    seed: int = 0
    views: int = 2  # replayable augmentation views (TrainViews) cycled over the epochs; 0/1 = none
    max_shift: int = 2
    hflip: bool = False


DEFAULT_RECIPES: dict[str, TeacherRecipe] = {
    "digits": TeacherRecipe(),
    "mnist": TeacherRecipe(epochs=5, batch_size=128, lr=3e-3, views=4),
    "fashion-mnist": TeacherRecipe(epochs=12, batch_size=128, lr=3e-3, views=4, hflip=True),
    "cifar10": TeacherRecipe(epochs=30, batch_size=128, lr=0.1, optimizer="sgd", views=8, max_shift=4, hflip=True),
    "cifar100": TeacherRecipe(epochs=40, batch_size=128, lr=0.1, optimizer="sgd", views=8, max_shift=4, hflip=True),
}


def default_teacher(dataset: str) -> str:
    """Default timm architecture of the teacher for ``dataset``."""
    return DEFAULT_TEACHERS.get(dataset, FALLBACK_TEACHER)


def default_recipe(dataset: str) -> TeacherRecipe:
    """Default training recipe of the teacher for ``dataset``."""
    return DEFAULT_RECIPES.get(dataset, TeacherRecipe(epochs=20, views=4, hflip=True))


@dataclass
class Teacher:
    model: nn.Module
    arch: str
    val_acc: float
    test_acc: float
    fingerprint: str  # sha1 of the checkpoint file, or the cache key of a trained teacher
    path: Path | None  # weights file
    trained: bool = False  # True when this call trained it (False: loaded from cache or checkpoint)


def _check_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch):
        close = close_matches(arch, timm.list_models(), n=5)
        hint = f"close matches: {', '.join(close)}" if close else "no close matches"
        raise UserError(f"unknown teacher architecture {arch!r} (not a timm model name); {hint}. "
                        "List them with `python -c \"import timm; print(timm.list_models())\"`.")


def _timm_create(arch: str, data: DataSplits, pretrained: bool, **extra: object) -> nn.Module:
    """``timm.create_model`` for this data; models with a fixed input size (ViT, DeiT, ...) are built for it."""
    import timm

    kwargs = {"pretrained": pretrained, "num_classes": data.num_classes, "in_chans": data.in_chans, **extra}
    try:
        # A vit_*_224 expects 224x224 inputs and fails on anything else; timm resizes its position embedding.
        return timm.create_model(arch, img_size=data.input_size, **kwargs)
    except TypeError:  # a CNN: no img_size argument, and any input size works
        return timm.create_model(arch, **kwargs)


def _check_takes_inputs(model: nn.Module, arch: str, data: DataSplits) -> None:
    """One forward pass on an input of the data's shape: a model that cannot take it is a user error now, not a
    traceback in the middle of teacher training."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, data.in_chans, data.input_size, data.input_size))
    except Exception as e:  # noqa: BLE001 - any failure means this architecture does not fit the data
        raise UserError(f"teacher {arch!r} cannot take {data.in_chans}x{data.input_size}x{data.input_size} inputs "
                        f"({type(e).__name__}: {str(e)[:200]}). Choose a larger --input-size, or another "
                        "--teacher (e.g. a CNN such as resnet18, which takes any size).") from None
    finally:
        model.train(was_training)


def _create(arch: str, data: DataSplits, pretrained: bool = False) -> nn.Module:
    model = _create_model(arch, data, pretrained)
    _check_takes_inputs(model, arch, data)
    return model


def _create_model(arch: str, data: DataSplits, pretrained: bool) -> nn.Module:
    if not pretrained:
        return _timm_create(arch, data, pretrained=False)
    # timm downloads missing weights, and huggingface_hub reads its offline switch (HF_HUB_OFFLINE) once, at
    # import. So the weights file is looked up in the local caches here and handed to timm as a file: no network.
    local = _cached_pretrained_file(arch)
    try:
        if local is None:
            raise FileNotFoundError(f"no weights of {arch!r} in the Hugging Face or torch hub cache")
        return _timm_create(arch, data, pretrained=True, pretrained_cfg_overlay={"file": local})
    except Exception as e:  # noqa: BLE001 - any failure here means "no usable local weights"
        raise UserError(f"pretrained weights for {arch!r} are not available locally ({type(e).__name__}: {e}). "
                        "autokd does not download at run time: put them in the Hugging Face cache first, pass a "
                        "local --teacher-checkpoint, or drop --teacher-pretrained to train the teacher here.") from None


def _cached_pretrained_file(arch: str) -> str | None:
    """The file timm would load ``arch``'s pretrained weights from, if it is in the local Hugging Face cache (or,
    for weights published by URL only, the torch hub cache); None when timm would have to download it."""
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        # timm's choice: the configured file name, else safetensors before the pickled torch file
        for name in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str):
                return found
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.is_file():
            return str(path)
    return None


def _fit(model: nn.Module, state: dict[str, Tensor], path: Path, arch: str, data: DataSplits) -> None:
    """Teacher weights read from ``path`` into ``model``, or a UserError naming the file and what does not fit."""
    load_weights(model, state, path,
                 f"teacher checkpoint {str(path)!r} does not fit timm {arch!r} with num_classes={data.num_classes}, "
                 f"in_chans={data.in_chans} ({data.name})",
                 fix="Pass the architecture it was trained with (--teacher ARCH) and a checkpoint for this dataset's "
                     "classes and channels.")


def _ready(model: nn.Module, device: str) -> nn.Module:
    # channels_last like the students (autokd.model.train.TrainConfig): the loop feeds the online teacher NHWC
    # batches, and NCHW weights with NHWC inputs slow its forward markedly (docs/design.md, "Decisions"). A
    # loaded checkpoint comes back NCHW, whatever it was trained in.
    model.to(device).to(memory_format=torch.channels_last).eval()
    model.requires_grad_(False)
    return model


def get_teacher(data: DataSplits, arch: str | None = None, checkpoint: str | None = None,
                cache_root: Path = Path("studies/teachers"), device: str = "cpu", pretrained: bool = False,
                recipe: TeacherRecipe | None = None) -> Teacher:
    """Load the teacher from ``checkpoint``, or from the cache, or train it (CE, ``recipe``) and cache it.

    Concurrent processes asking for the same teacher wait on a file lock; only the first one trains. A trained
    teacher is cached as ``cache_root/<arch>-<key>/model.safetensors`` + ``meta.json`` (key = hash of the data
    fingerprint, architecture, recipe and ``pretrained``; ``meta.json`` written last marks a complete entry).
    """
    from autokd.model.train import evaluate

    if checkpoint is not None:
        path = Path(os.path.expanduser(checkpoint))
        if arch is None and (path.parent / "meta.json").is_file():  # a teacher directory made by autokd
            with contextlib.suppress(OSError, ValueError, KeyError):
                arch = json.loads((path.parent / "meta.json").read_text())["arch"]
        arch = arch or default_teacher(data.name)
        _check_arch(arch)
        state = read_weights(path, "teacher checkpoint")
        model = _create(arch, data)
        _fit(model, state, path, arch, data)
        _ready(model, device)
        val_acc = evaluate(model, data.x_val.to(device), data.y_val.to(device))
        test_acc = evaluate(model, data.x_test.to(device), data.y_test.to(device))
        logger.info(f"teacher {arch}: loaded checkpoint {path} (val acc {val_acc:.4f}, test acc {test_acc:.4f})")
        return Teacher(model, arch, val_acc, test_acc, file_digest(path, "sha1"), path)

    arch = arch or default_teacher(data.name)
    _check_arch(arch)
    recipe = recipe or default_recipe(data.name)
    key = fingerprint_of({"data": data.fingerprint, "arch": arch, "recipe": asdict(recipe), "pretrained": pretrained})
    cache_root = Path(cache_root)
    tdir = cache_root / f"{arch}-{key[:16]}"
    with file_lock(cache_root / f".{tdir.name}.lock"):
        cached = _load_cached(tdir, arch, data, device)
        if cached is not None:
            model, meta = cached
            logger.info(f"teacher {arch}: loaded from cache {tdir} (val acc {meta['val_acc']:.4f}, "
                        f"test acc {meta['test_acc']:.4f}); not retrained")
            return Teacher(model, arch, meta["val_acc"], meta["test_acc"], key, tdir / "model.safetensors",
                           trained=False)
        model, meta = _train(arch, data, recipe, pretrained, device)
        meta.update(key=key, arch=arch, data_fingerprint=data.fingerprint, dataset=data.name, pretrained=pretrained)
        _save(tdir, model, meta)
        logger.info(f"teacher {arch}: trained in {meta['train_seconds']:.1f}s (val acc {meta['val_acc']:.4f}, "
                    f"test acc {meta['test_acc']:.4f}); cached in {tdir}")
        return Teacher(model, arch, meta["val_acc"], meta["test_acc"], key, tdir / "model.safetensors",
                       trained=True)


def _train(arch: str, data: DataSplits, recipe: TeacherRecipe, pretrained: bool,
           device: str) -> tuple[nn.Module, dict]:
    from autokd.model.losses import build_loss
    from autokd.model.train import EpochResult, TrainConfig, distill, evaluate

    torch.manual_seed(recipe.seed)
    model = _create(arch, data, pretrained)
    cfg = TrainConfig(epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                      weight_decay=recipe.weight_decay, optimizer=recipe.optimizer, seed=recipe.seed, device=device)
    views = TrainViews(recipe.views, seed=recipe.seed, max_shift=recipe.max_shift, hflip=recipe.hflip)
    logger.info(f"teacher {arch}: training on {data.name} ({len(data.y_train)} images, {device}) "
                f"for {recipe.epochs} epochs")

    def on_epoch(r: EpochResult) -> None:
        logger.info(f"  teacher epoch {r.epoch}/{recipe.epochs}: loss {r.train_loss:.4f}, val acc {r.val_acc:.4f}, "
                    f"{r.seconds:.1f}s")

    result = distill(model, build_loss("ce"), data, cfg, views=views if recipe.views > 1 else None,
                     on_epoch=on_epoch)
    _ready(model, device)
    test_acc = evaluate(model, data.x_test.to(device), data.y_test.to(device))
    meta = {"val_acc": result.val_acc, "test_acc": test_acc, "recipe": asdict(recipe),
            "train_seconds": result.seconds, "num_classes": data.num_classes, "in_chans": data.in_chans,
            "input_size": data.input_size, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return model, meta


def _save(tdir: Path, model: nn.Module, meta: dict) -> None:
    atomic_save_tensors(tdir / "model.safetensors", model.state_dict())
    atomic_write_json(tdir / "meta.json", meta)  # written last: its presence marks a complete entry


def _load_cached(tdir: Path, arch: str, data: DataSplits, device: str) -> tuple[nn.Module, dict] | None:
    meta_path, weights = tdir / "meta.json", tdir / "model.safetensors"
    if not (meta_path.is_file() and weights.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        model = _create(arch, data)
        _fit(model, read_weights(weights), weights, arch, data)
    except (OSError, ValueError, KeyError, UserError) as e:
        logger.warning(f"teacher {arch}: cache entry {tdir} is unreadable ({e}); retraining")
        return None
    return _ready(model, device), meta


# Teacher logits (and feature maps) for training views: the interface is the loop's own (train.TeacherSource),
# so that the loop never imports this module.
TeacherOutputs = TeacherSource


class CachedTeacherOutputs(TeacherSource):
    """Rows of precomputed tensors ``[V, N, ...]`` looked up by (view, training image index)."""

    mode = "cached"

    def __init__(self, logits: Tensor, features: Tensor | None = None) -> None:
        self._logits = logits
        self._features = features
        self.feature_channels = None if features is None else int(features.shape[2])

    def logits(self, x_view: Tensor, idx: Tensor, view: int) -> Tensor:
        return self._logits[view][idx.to(self._logits.device)]

    def features(self, x_view: Tensor, idx: Tensor, view: int) -> Tensor:
        if self._features is None:
            raise RuntimeError("teacher features were not cached (teacher_outputs(..., need_features=False))")
        return self._features[view][idx.to(self._features.device)]


class OnlineTeacherOutputs(TeacherSource):
    """Runs the teacher on each batch (no cache); logits and features come from one forward pass."""

    mode = "online"

    def __init__(self, model: nn.Module, need_features: bool = False, feature_channels: int | None = None) -> None:
        self.model = model.eval()
        self.need_features = need_features
        self.feature_channels = feature_channels or (getattr(model, "num_features", None) if need_features else None)
        self._last: tuple[Tensor, Tensor, Tensor | None] | None = None

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self._last is not None and self._last[0] is x:
            return self._last[1], self._last[2]
        # no_grad, not inference_mode: the outputs enter the student's autograd graph as constants.
        with torch.no_grad():
            if self.need_features:
                from autokd.model.students import forward_with_features

                logits, feats = forward_with_features(self.model, x)
            else:
                logits, feats = self.model(x), None
        logits = logits.float()
        self._last = (x, logits, feats) if self.need_features else None
        return logits, feats

    def logits(self, x_view: Tensor, idx: Tensor, view: int) -> Tensor:
        return self._run(x_view)[0]

    def features(self, x_view: Tensor, idx: Tensor, view: int) -> Tensor:
        if not self.need_features:
            raise RuntimeError("OnlineTeacherOutputs was built with need_features=False")
        feats = self._run(x_view)[1]
        self._last = None  # the batch is done: do not keep it alive
        return feats


def teacher_outputs(teacher: Teacher, data: DataSplits, views: TrainViews | None, cache_root: Path,
                    device: str = "cpu", need_features: bool = False, max_feature_bytes: int = MAX_FEATURE_BYTES,
                    batch_size: int = 256) -> TeacherOutputs:
    """Teacher outputs for every (view, training image), computed once and cached on disk under
    ``cache_root/outputs/<hash>.pt`` (``{"logits": [V, N, K], "features": [V, N, C, H, W] | None}``); falls back
    to running the teacher online (and logs it) when the feature maps would exceed ``max_feature_bytes``."""
    from autokd.model.students import forward_with_features

    views = views or TrainViews(0)
    model = _ready(teacher.model, device)
    n, count = len(data.y_train), views.count
    with torch.no_grad():
        probe = forward_with_features(model, data.x_train[:1].to(device))[1] if need_features else None
    if probe is not None:
        size = count * n * probe[0].numel() * 4
        if size > max_feature_bytes:
            logger.info(f"teacher outputs: features for {count} view(s) x {n} images would take "
                        f"{size / 2**20:.0f} MB (limit {max_feature_bytes / 2**20:.0f} MB); running the teacher "
                        "online instead of caching")
            return OnlineTeacherOutputs(model, need_features=True, feature_channels=int(probe.shape[1]))

    key = fingerprint_of({"teacher": teacher.fingerprint, "data": data.fingerprint, "views": views.fingerprint,
                 "features": need_features, "version": OUTPUTS_VERSION})
    path = Path(cache_root) / "outputs" / f"{key}.pt"
    with file_lock(path.parent / f".{key}.lock"):
        stored = _load_outputs(path, count, n, data.num_classes, need_features)
        if stored is not None:
            logger.info(f"teacher outputs: reusing {path}")
        else:
            t0 = time.perf_counter()
            stored = _compute_outputs(model, data, views, device, need_features, batch_size)
            with atomic_path(path) as tmp:
                torch.save(stored, tmp)
            logger.info(f"teacher outputs: computed {count} view(s) x {n} images in "
                        f"{time.perf_counter() - t0:.1f}s; cached in {path}")
    feats = stored["features"]
    return CachedTeacherOutputs(stored["logits"].to(device), None if feats is None else feats.to(device))


def _compute_outputs(model: nn.Module, data: DataSplits, views: TrainViews, device: str, need_features: bool,
                     batch_size: int) -> dict[str, Tensor | None]:
    from autokd.model.students import forward_with_features

    x_train = data.x_train.to(device)
    all_logits, all_feats = [], []
    with torch.no_grad():
        for view in range(views.count):
            logits, feats = [], []
            for idx in torch.arange(len(data.y_train), device=device).split(batch_size):
                x = views.apply(x_train[idx], idx, view)
                if need_features:
                    out, f = forward_with_features(model, x)
                    feats.append(f.float().cpu())
                else:
                    out = model(x)
                logits.append(out.float().cpu())
            all_logits.append(torch.cat(logits))
            if need_features:
                all_feats.append(torch.cat(feats))
    return {"logits": torch.stack(all_logits), "features": torch.stack(all_feats) if need_features else None}


def _load_outputs(path: Path, count: int, n: int, num_classes: int, need_features: bool) -> dict | None:
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        ok = (tuple(stored["logits"].shape) == (count, n, num_classes)
              and (stored["features"] is not None) == need_features)
    except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed, never fatal
        logger.warning(f"teacher outputs: cache file {path} is unreadable ({type(e).__name__}: {e}); recomputing")
        return None
    if not ok:
        logger.warning(f"teacher outputs: cache file {path} has unexpected shapes; recomputing")
        return None
    return stored


__all__ = [
    "DEFAULT_RECIPES", "DEFAULT_TEACHERS", "CachedTeacherOutputs", "OnlineTeacherOutputs", "Teacher",
    "TeacherOutputs", "TeacherRecipe", "default_recipe", "default_teacher", "get_teacher", "teacher_outputs",
]
