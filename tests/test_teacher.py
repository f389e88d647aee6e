from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import timm
import torch
from conftest import Logged

from autokd.errors import UserError
from autokd.model.data import TrainViews, load_dataset
from autokd.model.losses import build_loss
from autokd.model.teacher import (
    DEFAULT_TEACHERS,
    OnlineTeacherOutputs,
    Teacher,
    TeacherRecipe,
    get_teacher,
    teacher_outputs,
)
from autokd.model.train import TrainConfig, distill

ARCH = "test_resnet"  # timm's tiny test network: keeps teacher training to a second or two
RECIPE = TeacherRecipe(epochs=2, batch_size=32, lr=1e-2)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", input_size=16, train_limit=96)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="module")
def teacher(data, teacher_dir: Path) -> Teacher:
    t = get_teacher(data, arch=ARCH, cache_root=teacher_dir, recipe=RECIPE)
    assert t.trained
    return t


def test_defaults_cover_builtin_datasets() -> None:
    from autokd.model.data import available_datasets

    assert set(available_datasets()) <= set(DEFAULT_TEACHERS)
    assert all(timm.is_model(a) for a in DEFAULT_TEACHERS.values())


def test_trained_teacher_is_cached_and_reused(data, teacher: Teacher, teacher_dir: Path, logged: Logged) -> None:
    assert teacher.path is not None and teacher.path.name == "model.safetensors"
    meta = json.loads((teacher.path.parent / "meta.json").read_text())
    assert meta["arch"] == ARCH and meta["data_fingerprint"] == data.fingerprint
    assert meta["recipe"]["epochs"] == 2 and meta["val_acc"] == teacher.val_acc
    assert not list(teacher.path.parent.glob("*.tmp"))

    again = get_teacher(data, arch=ARCH, cache_root=teacher_dir, recipe=RECIPE)
    assert not again.trained and "cache" in logged()[-1]
    assert again.fingerprint == teacher.fingerprint and again.val_acc == teacher.val_acc
    for a, b in zip(again.model.state_dict().values(), teacher.model.state_dict().values()):
        assert torch.equal(a, b)
    # The recipe is part of the key: another recipe is another teacher.
    other = TeacherRecipe(epochs=1, batch_size=32, lr=1e-2)
    assert get_teacher(data, arch=ARCH, cache_root=teacher_dir, recipe=other).trained


def test_concurrent_callers_train_once(data, tmp_path: Path) -> None:
    results: list[Teacher] = []
    recipe = TeacherRecipe(epochs=1, batch_size=48, lr=1e-2)

    def work() -> None:
        results.append(get_teacher(data, arch=ARCH, cache_root=tmp_path, recipe=recipe))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.trained for r in results) == [False, True]


def test_unknown_arch_suggests_close_names(data, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="resnet18"):
        get_teacher(data, arch="resnet19", cache_root=tmp_path)


def test_fixed_input_size_teacher_is_built_for_the_data(data, tmp_path: Path) -> None:
    """A ViT (timm builds it for 224 px by default) is built for the data's size, trained, and reloaded; one
    whose patch is larger than the images is a user error naming the shape, before any training."""
    recipe = TeacherRecipe(epochs=1, batch_size=32, lr=1e-3)
    vit = get_teacher(data, arch="test_vit", cache_root=tmp_path, recipe=recipe)
    assert vit.trained and vit.model.patch_embed.img_size == (16, 16)
    again = get_teacher(data, arch="test_vit", checkpoint=str(vit.path))
    assert again.val_acc == pytest.approx(vit.val_acc)
    tiny = load_dataset("digits", input_size=8, train_limit=96)
    with pytest.raises(UserError, match=r"'test_vit' cannot take 1x8x8 inputs.*--input-size"):
        get_teacher(tiny, arch="test_vit", cache_root=tmp_path / "tiny", recipe=recipe)
    assert not list((tmp_path / "tiny").rglob("*.safetensors"))


def test_load_checkpoint(data, teacher: Teacher, tmp_path: Path) -> None:
    loaded = get_teacher(data, arch=ARCH, checkpoint=str(teacher.path), cache_root=tmp_path)
    assert loaded.val_acc == pytest.approx(teacher.val_acc) and not loaded.trained
    assert loaded.fingerprint == hashlib.sha1(teacher.path.read_bytes()).hexdigest()
    pt = tmp_path / "teacher.pt"
    torch.save({"state_dict": teacher.model.state_dict()}, pt)
    assert get_teacher(data, arch=ARCH, checkpoint=str(pt)).val_acc == pytest.approx(
        teacher.val_acc)
    # The arch comes from meta.json when the checkpoint lives in an autokd teacher directory.
    assert get_teacher(data, checkpoint=str(teacher.path)).arch == ARCH


@pytest.mark.faults
def test_bad_checkpoints(data, teacher: Teacher, tmp_path: Path) -> None:
    raw = teacher.path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="truncated.safetensors"):
        get_teacher(data, arch=ARCH, checkpoint=str(truncated))

    pt = tmp_path / "model.pt"
    torch.save(teacher.model.state_dict(), pt)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(pt.read_bytes()[:1000])
    with pytest.raises(UserError, match="cut.pt"):
        get_teacher(data, arch=ARCH, checkpoint=str(cut))

    with pytest.raises(UserError, match="missing keys|unexpected keys") as e:
        get_teacher(data, arch="resnet10t", checkpoint=str(pt))
    assert "model.pt" in str(e.value)

    other = timm.create_model(ARCH, num_classes=5, in_chans=1)
    wrong = tmp_path / "five_classes.pt"
    torch.save(other.state_dict(), wrong)
    with pytest.raises(UserError, match="shape mismatch.*fc"):
        get_teacher(data, arch=ARCH, checkpoint=str(wrong))

    with pytest.raises(UserError, match="does not exist"):
        get_teacher(data, arch=ARCH, checkpoint=str(tmp_path / "nope.pt"))


def test_pretrained_without_local_weights_is_a_user_error(data, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty hub cache
    with pytest.raises(UserError, match="not available locally"):
        get_teacher(data, arch=ARCH, pretrained=True, cache_root=tmp_path, recipe=RECIPE)


def test_pretrained_weights_come_from_the_local_hub_cache(data, tmp_path: Path, monkeypatch) -> None:
    # Weights already in the Hugging Face cache are used (adapted to the data's classes and channels), without
    # the network: the file is found in the cache and handed to timm.
    import huggingface_hub.constants
    from safetensors.torch import save_file

    hub = tmp_path / "hub"
    repo = hub / "models--timm--test_resnet.r160_in1k"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    torch.manual_seed(0)
    source = timm.create_model(ARCH).state_dict()  # ImageNet-shaped: 1000 classes, 3 channels
    save_file(dict(source), str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    frozen = TeacherRecipe(epochs=1, batch_size=48, lr=0.0)  # lr 0: the weights stay the loaded ones
    t = get_teacher(data, arch=ARCH, pretrained=True, cache_root=tmp_path / "t", recipe=frozen)
    got = t.model.state_dict()
    assert got["fc.weight"].shape[0] == data.num_classes and got["conv1.0.weight"].shape[1] == data.in_chans
    assert torch.allclose(got["conv1.0.weight"].cpu(), source["conv1.0.weight"].sum(1, keepdim=True), atol=1e-6)
    assert torch.equal(got["layer1.0.conv1.weight"].cpu(), source["layer1.0.conv1.weight"])


@pytest.mark.slow
def test_corrupt_cache_entry_is_retrained(data, tmp_path: Path, logged: Logged) -> None:
    recipe = TeacherRecipe(epochs=1, batch_size=48, lr=1e-2)
    first = get_teacher(data, arch=ARCH, cache_root=tmp_path, recipe=recipe)
    first.path.write_bytes(b"garbage")
    again = get_teacher(data, arch=ARCH, cache_root=tmp_path, recipe=recipe)
    assert again.trained and any("unreadable" in m for m in logged())


def test_cached_and_online_outputs_agree(data, teacher: Teacher, teacher_dir: Path, logged: Logged) -> None:
    views = TrainViews(num_views=3, seed=1, max_shift=2, hflip=True)
    cached = teacher_outputs(teacher, data, views, cache_root=teacher_dir, need_features=True)
    assert cached.mode == "cached" and "computed" in logged()[-1]
    files = list((teacher_dir / "outputs").glob("*.pt"))
    assert len(files) == 1
    stored = torch.load(files[0], weights_only=True)
    assert stored["logits"].shape == (3, len(data.y_train), 10)

    online = OnlineTeacherOutputs(teacher.model, need_features=True)
    assert cached.feature_channels == online.feature_channels
    idx = torch.tensor([5, 0, 77, 31, 64])
    kd = build_loss("kd", alpha=0.7, temperature=4.0)
    for view in range(3):
        x = views.apply(data.x_train[idx], idx, view)
        c, o = cached.logits(x, idx, view), online.logits(x, idx, view)
        assert torch.allclose(c, o, atol=1e-5)
        assert torch.allclose(cached.features(x, idx, view), online.features(x, idx, view), atol=1e-5)
        s = torch.randn(len(idx), 10)
        assert torch.allclose(kd(s, c, data.y_train[idx]), kd(s, o, data.y_train[idx]), atol=1e-6)

    again = teacher_outputs(teacher, data, views, cache_root=teacher_dir, need_features=True)
    assert "reusing" in logged()[-1] and torch.equal(again.logits(None, idx, 2), cached.logits(None, idx, 2))


def test_distill_same_with_cached_or_online_teacher(data, teacher: Teacher, teacher_dir: Path) -> None:
    views = TrainViews(num_views=2, seed=0)
    cached = teacher_outputs(teacher, data, views, cache_root=teacher_dir)
    online = OnlineTeacherOutputs(teacher.model)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01)

    def run(outputs) -> list[float]:
        torch.manual_seed(0)
        student = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                                      torch.nn.Linear(8 * 7 * 7, 10))
        r = distill(student, build_loss("kd"), data, cfg, teacher=outputs, views=views)
        assert r.teacher_mode == outputs.mode
        return [e.train_loss for e in r.epochs]

    assert run(cached) == pytest.approx(run(online), rel=1e-4)


def test_feature_cache_over_limit_falls_back_to_online(data, teacher: Teacher, tmp_path: Path, logged: Logged) -> None:
    out = teacher_outputs(teacher, data, TrainViews(0), cache_root=tmp_path, need_features=True, max_feature_bytes=1)
    assert out.mode == "online" and "online" in logged()[-1]
    assert not (tmp_path / "outputs").exists()


def test_corrupt_outputs_cache_is_recomputed(data, teacher: Teacher, tmp_path: Path, logged: Logged) -> None:
    teacher_outputs(teacher, data, TrainViews(0), cache_root=tmp_path)
    (path,) = (tmp_path / "outputs").glob("*.pt")
    path.write_bytes(path.read_bytes()[:100])
    out = teacher_outputs(teacher, data, TrainViews(0), cache_root=tmp_path)
    assert out.mode == "cached" and any("unreadable" in m for m in logged())
