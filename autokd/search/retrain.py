"""`autokd distill --from-trial N`: a finished trial's exact student and distillation settings, to train it
again (longer, with another seed, or on all the training images after a search on a subset)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from autokd.config import DataSettings, DistillSettings
from autokd.errors import UserError
from autokd.study import record

#: The options that --from-trial takes from the trial; giving one of them as well is a contradiction.
TRIAL_FIELDS = ("family", "width", "depth", "loss", "temperature", "alpha", "beta", "warmup", "batch_size", "lr",
                "weight_decay", "optimizer", "views", "teacher", "teacher_pretrained", "input_size")


def settings_from_trial(study_name: str | None, storage: str | None, root: Path, number: int,
                        overrides: dict[str, Any]) -> DistillSettings:
    """DistillSettings of trial ``number`` (COMPLETE or PRUNED: every trial records its parameters) of the study:
    its student, loss and hyperparameters, optimizer, batch size, the study's data, input size, views and
    teacher architecture; ``overrides`` (``epochs``, ``seed``, ``train_limit``, ``data_dir``, ``device``,
    ``out``, ``teacher_checkpoint``) replace what they name. Without ``epochs``, the trial's own epoch budget; without ``train_limit``,
    every training image (the search's subset is not kept)."""
    from autokd.model.space import TrialParams
    from autokd.report.build import resolve_study

    study = resolve_study(study_name, storage, root)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise UserError(f"--from-trial {number}: study {study.study_name!r} has no trial {number} (trials 0 to "
                        f"{max(trials) if trials else -1})")
    flat = record.sampled_params(trials[number].user_attrs)
    if not flat:
        raise UserError(f"--from-trial {number}: trial {number} of study {study.study_name!r} recorded no "
                        "parameters (it failed before sampling): pick another trial")
    params = TrialParams.from_flat(flat)
    attrs = study.user_attrs
    teacher = str(attrs.get(record.TEACHER_ATTR) or "").split("@")[0] or None
    data = DataSettings(dataset=attrs.get(record.DATASET_ATTR, "digits"),
                        data_dir=overrides.get("data_dir") or attrs.get(record.DATA_DIR_ATTR),
                        input_size=attrs.get(record.INPUT_SIZE_ATTR), train_limit=overrides.get("train_limit"))
    base = DistillSettings(
        family=params.family, width=params.width, depth=params.depth, loss=params.loss,
        loss_params=dict(params.loss_params), epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
        weight_decay=params.weight_decay, optimizer=params.optimizer, data=data, teacher=teacher,
        views=int((attrs.get(record.SPACE_ATTR) or {}).get("views", 0) or 0), root=Path(root),
        from_trial=f"{study.study_name}#{number}")
    chosen = {k: v for k, v in overrides.items()
              if k in ("epochs", "seed", "device", "out", "teacher_checkpoint") and v is not None}
    return dataclasses.replace(base, **chosen)
