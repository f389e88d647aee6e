"""The MLflow UI a newcomer opens: a model-training experiment whose runs page shows the study's parent run and
its nested trials (not MLflow 3's GenAI overview), and a parent run whose duration is the search's."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from browser import Browser, chromium
from test_search import TINY_SPACE, settings

from autokd.cli import main
from autokd.search.run import run_search
from autokd.tracking._mlflow import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

pytestmark = pytest.mark.slow

# Expands every parent row of MLflow's runs table (its nested runs are collapsed at first); returns how many.
_EXPAND = """(() => { const buttons = [...document.querySelectorAll('button')].filter(
    b => (b.getAttribute('data-component-id') || '').includes('runnamecellrenderer'));
  buttons.forEach(b => b.click()); return buttons.length; })()"""


def test_parent_run_spans_the_search_and_the_ui_opens_on_its_trials(
        tmp_path: Path, tiny_teacher: tuple[str, Path], mlflow_server: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    name = "ui-newcomer"
    seen: list[str] = []

    def on_trial(outcome: object, progress: object) -> None:  # called after each trial: the parent is RUNNING then
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            parents = client.search_runs([experiment.experiment_id], "tags.`autokd.role` = 'parent'")
            seen.extend(r.info.status for r in parents)

    run_search(settings(tmp_path, tiny_teacher, space, budget=3, study=name, mlflow=True,
                        tracking_uri=mlflow_server), on_trial=on_trial)
    assert seen == ["RUNNING"] * 3

    experiment = client.get_experiment_by_name(name)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("autokd.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and parent.info.status == "FINISHED"
    assert parent.info.start_time <= min(c.info.start_time for c in children)
    assert parent.info.end_time >= max(c.info.end_time for c in children)

    # `autokd ui` on a tracking server prints the study's runs page (the server serves the UI itself).
    assert main(["--root", str(tmp_path / "studies"), "ui", "--tracking-uri", mlflow_server, "--study", name]) == 0
    url = re.findall(r"http://\S+", capsys.readouterr().out)[-1]
    assert url == f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"

    if chromium() is None:
        pytest.skip("chromium not installed (apt-get install chromium): the browser half of this test did not run")
    browser = Browser(tmp_path / "profile")
    try:
        browser.goto(url)
        # The runs table's header, not the GenAI overview (the table draws after its "matching runs" count).
        text = browser.wait_for_text("Run Name", timeout=90)
        assert name in text and "Run Name" in text and "matching runs" in text, text[:2000]
        expanded = 0
        deadline = time.monotonic() + 30
        while not expanded and time.monotonic() < deadline:
            expanded = browser.evaluate(_EXPAND) or 0
            time.sleep(0.5)
        assert expanded >= 1, text[:2000]
        text = browser.wait_for_text("trial-2", timeout=30)
    finally:
        browser.close()
    for child in ("trial-0", "trial-1", "trial-2"):
        assert child in text, text[:2000]
