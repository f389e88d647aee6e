"""`autokd distill`: train one student against the cached teacher, log progress, save weights + config."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from autokd.config import DistillSettings
from autokd.errors import UserError, as_user_error
from autokd.model.checkpoint import write_checkpoint

logger = logging.getLogger(__name__)


def run_distill(s: DistillSettings) -> dict[str, Any]:
    """Distil one student; returns the saved config (incl. val/test accuracy) and writes it under ``s.out``.

    Progress (one line per epoch) is logged at INFO under ``autokd.model.distill``.
    """
    from autokd.model.data import TrainViews, load_dataset
    from autokd.model.losses import build_loss
    from autokd.model.students import build_from_spec, resolve_student
    from autokd.model.teacher import get_teacher, teacher_outputs
    from autokd.model.train import EpochResult, TrainConfig, distill, evaluate
    from autokd.utils.devices import resolve_device

    device = resolve_device(s.device)
    with as_user_error():  # --loss and its hyperparameters: the loss registry's own checks and messages
        loss_fn = build_loss(s.loss, **s.loss_params)
    d = s.data
    data = load_dataset(d.dataset, data_dir=d.data_dir, input_size=d.input_size, seed=0, download=d.download,
                        train_limit=d.train_limit)
    with as_user_error():  # --family, --width, --depth
        spec = resolve_student(s.family, s.width, s.depth, num_classes=data.num_classes, in_chans=data.in_chans,
                               input_size=data.input_size)
    outputs = None
    teacher_arch = None
    root = Path(s.root)
    if loss_fn.uses_teacher:
        t = get_teacher(data, arch=s.teacher, checkpoint=s.teacher_checkpoint, cache_root=root / "teachers",
                        device=device, pretrained=s.teacher_pretrained)
        teacher_arch = t.arch
        outputs = teacher_outputs(t, data, TrainViews(s.views), cache_root=root / "teachers", device=device,
                                  need_features=loss_fn.uses_features)
    import torch

    torch.manual_seed(s.seed)  # the student's initial weights too: the same command and --seed, the same student
    student = build_from_spec(spec)
    cfg = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay,
                      optimizer=s.optimizer, seed=s.seed, device=device)
    logger.info(f"distilling {spec.key} ({spec.model_name} {spec.kwargs}) with {s.loss} {s.loss_params or ''} for "
                f"{s.epochs} epochs on {data.name} ({device})")

    def on_epoch(r: EpochResult) -> None:
        logger.info(f"epoch {r.epoch:>3}/{s.epochs}  train loss {r.train_loss:.4f}  val acc {r.val_acc:.4f}  "
                    f"lr {r.lr:.2e}  {r.seconds:.1f}s")

    started = time.perf_counter()
    data = data.to(device)
    # The views the teacher's outputs were computed for (a trial's: its space's `views`), as the search shows them.
    result = distill(student, loss_fn, data, cfg, teacher=outputs, views=TrainViews(s.views), on_epoch=on_epoch)
    test_acc = float(evaluate(student, data.x_test, data.y_test))
    config = {
        "student": spec.to_dict(), "loss": s.loss, "loss_params": s.loss_params, "teacher": teacher_arch,
        "epochs": s.epochs, "batch_size": s.batch_size, "lr": s.lr, "weight_decay": s.weight_decay,
        "optimizer": s.optimizer, "seed": s.seed, "views": s.views, "from_trial": s.from_trial,
        "dataset": data.name, "data_fingerprint": data.fingerprint,
        "val_acc": float(result.val_acc), "test_acc": test_acc, "seconds": time.perf_counter() - started,
    }
    out = s.out or root / "distill" / f"{spec.key}-{s.loss}-s{s.seed}"
    try:
        write_checkpoint(student, config, out)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write the student there: {exc}") from exc
    logger.info(f"val acc {result.val_acc:.4f}  test acc {test_acc:.4f}  — saved to {out}/")
    return config
