"""`autokd latency-server` as a real process on 127.0.0.1: contract, security, and its use by a search."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import pytest
from conftest import free_port, repo_pythonpath
from onnx import TensorProto, helper, numpy_helper

from autokd.errors import UserError
from autokd.latency.remote.client import RemoteLatencyError, RemoteTarget, validate_target_url
from autokd.latency.remote.guard import external_data_reason
from autokd.latency.remote.server import RUNTIME_FAILURE, LatencyHTTPServer

TOKEN = "s3cret-token"


def matmul_model(size: int = 16) -> onnx.ModelProto:
    """A one-node ONNX model with its weight inside the file."""
    weight = numpy_helper.from_array(np.random.default_rng(0).random((size, size), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def start_server(port: int, *extra: str, token: str | None = TOKEN) -> subprocess.Popen:
    """`python -m autokd.latency.remote.server` on 127.0.0.1:port, waited for until /health answers."""
    cmd = [sys.executable, "-m", "autokd.latency.remote.server", "--port", str(port), *extra]
    if token is not None:
        cmd += ["--token", token]
    env = dict(os.environ, PYTHONPATH=repo_pythonpath())
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"latency server exited with {proc.returncode}: {proc.stdout.read().decode()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("latency server did not answer /health within 30 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    proc = start_server(port, "--max-bytes", "200000")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)


def post(url: str, body: bytes, token: str | None = TOKEN, query: str = "batch=1&threads=1") -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{url}/measure?{query}", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_health_needs_no_token_and_tells_nothing_secret(server: str) -> None:
    with urllib.request.urlopen(f"{server}/health", timeout=5) as resp:
        payload = json.loads(resp.read())
    assert payload["status"] == "ok" and payload["service"] == "autokd-latency-server"
    assert TOKEN not in json.dumps(payload)


def test_measure_times_a_model_and_answers_the_signature(server: str) -> None:
    status, payload = post(server, matmul_model().SerializeToString())
    assert status == 200, payload
    result, signature = payload["result"], payload["signature"]
    assert result["median_ms"] > 0
    assert signature["runtime"] == "onnxruntime" and signature["threads"] == 1
    assert signature["provider"] == "CPUExecutionProvider" and signature["version"]


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_401(server: str, token: str | None) -> None:
    status, payload = post(server, matmul_model().SerializeToString(), token=token)
    assert status == 401 and "token" in payload["error"]


def test_body_over_the_limit_is_413(server: str) -> None:
    status, payload = post(server, matmul_model(size=300).SerializeToString())  # 360 kB > 200000 bytes
    assert status == 413 and "200000" in payload["error"]


def test_a_file_that_is_not_onnx_is_400_with_its_reason(server: str) -> None:
    status, payload = post(server, b"this is not an onnx model" * 10)
    assert status == 400 and "ONNX" in payload["error"] and payload["category"] == "malformed"
    # A well-formed protobuf that ONNX Runtime still cannot load: a fixed reason, never ONNX Runtime's own text
    # (it can quote what the runtime read on the server); the details go to the server's log.
    status, payload = post(server, helper.make_model(helper.make_graph([], "empty", [], [])).SerializeToString())
    assert status == 400 and payload == {"error": RUNTIME_FAILURE, "category": "runtime"}


def test_a_model_with_external_data_is_refused(server: str, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(matmul_model(), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    body = path.read_bytes()
    assert external_data_reason(body) is not None
    status, payload = post(server, body)
    assert status == 400 and "external data" in payload["error"] and payload["category"] == "external-data"
    assert external_data_reason(matmul_model().SerializeToString()) is None


def test_declared_inputs_over_the_limit_are_refused(server: str) -> None:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "huge",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1 << 30])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1 << 30])])
    status, payload = post(server, helper.make_model(graph).SerializeToString())
    assert status == 400 and payload["category"] == "input-too-large"


def test_bad_query_parameters_are_400(server: str) -> None:
    status, payload = post(server, matmul_model().SerializeToString(), query="batch=0")
    assert status == 400 and "batch" in payload["error"]


def test_a_non_loopback_bind_without_a_token_is_refused() -> None:
    with pytest.raises(UserError, match="without a token"):
        LatencyHTTPServer(("0.0.0.0", 0), token=None)
    env = dict(os.environ, PYTHONPATH=repo_pythonpath())
    env.pop("AUTOKD_LATENCY_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "autokd.cli", "latency-server", "--host", "0.0.0.0", "--port",
                           str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "without a token" in done.stderr


def test_both_entry_points_take_the_same_options(capsys: pytest.CaptureFixture[str]) -> None:
    """`autokd latency-server` and `python -m autokd.latency.remote.server` share one definition of the options:
    the same flags, help, defaults and checks."""
    from autokd import cli
    from autokd.latency.remote import server as latency_server

    def run(parse: Callable[[list[str]], argparse.Namespace], argv: list[str]) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exited:
            parse(argv)
        out = capsys.readouterr()
        return int(exited.value.code or 0), out.out + out.err

    standalone = latency_server.build_parser().parse_args

    def subcommand(argv: list[str]) -> argparse.Namespace:
        return cli.build_parser().parse_args(["latency-server", *argv])

    helps = [run(parse, ["--help"])[1].split("\n\n", 1)[1] for parse in (standalone, subcommand)]
    assert helps[0] == helps[1] and "--max-bytes" in helps[0] and "--token" in helps[0]
    assert vars(standalone([])) == {k: v for k, v in vars(subcommand([])).items() if k not in ("command", "root")}
    for parse in (standalone, subcommand):
        code, err = run(parse, ["--max-bytes", "0"])
        assert code == 2 and "'0' must be >= 1" in err


def test_the_server_imports_neither_torch_nor_timm() -> None:
    code = (
        "import sys, json, threading, urllib.request\n"
        "from autokd.latency.remote.server import LatencyHTTPServer\n"
        "import numpy as np\n"
        "from onnx import TensorProto, helper, numpy_helper\n"
        "w = numpy_helper.from_array(np.ones((8, 8), dtype=np.float32), 'W')\n"
        "g = helper.make_graph([helper.make_node('MatMul', ['x', 'W'], ['y'])], 'g',\n"
        "    [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 8])],\n"
        "    [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 8])], [w])\n"
        "model = helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)]).SerializeToString()\n"
        "srv = LatencyHTTPServer(('127.0.0.1', 0), token='t')\n"
        "threading.Thread(target=srv.serve_forever, daemon=True).start()\n"
        "req = urllib.request.Request(f'http://127.0.0.1:{srv.server_address[1]}/measure', method='POST',\n"
        "    data=model, headers={'Authorization': 'Bearer t'})\n"
        "assert json.loads(urllib.request.urlopen(req, timeout=120).read())['result']['median_ms'] > 0\n"
        "srv.shutdown()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision'))\n"
        "print('HEAVY', bad)\n"
    )
    env = dict(os.environ, PYTHONPATH=repo_pythonpath())
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def test_client_validates_the_url_and_reports_an_unreachable_target() -> None:
    with pytest.raises(UserError, match="HOST:PORT"):
        validate_target_url("127.0.0.1:8765")
    target = RemoteTarget(f"http://127.0.0.1:{free_port()}", TOKEN, retry_delays_s=(0.05, 0.05))
    with pytest.raises(UserError, match="unreachable"):
        target.check(threads=1)
    with pytest.raises(RemoteLatencyError, match="unreachable after 3 attempts"):
        target.measure(matmul_model().SerializeToString(), 1, 1)


def test_client_checks_the_token_at_start(server: str) -> None:
    with pytest.raises(UserError, match="--latency-token"):
        RemoteTarget(server, "wrong").check(threads=1)
    signature = RemoteTarget(server, TOKEN).check(threads=1)
    assert signature["runtime"] == "onnxruntime"


# ---------------------------------------------------------------------------------------------------------
# A search timing its students on the server
# ---------------------------------------------------------------------------------------------------------

# Width is continuous: every trial is a new architecture, so every trial asks the server.
REMOTE_SPACE = """
name: remote
epochs: 1
input_size: 16
students:
  width: {low: 0.25, high: 0.5}
  depth: 0.25
  families: [resnet]
losses:
  ce: {}
optimizer: {name: adamw, lr: 0.01, weight_decay: 0.0001}
batch_size: 32
"""


def search_cmd(tmp_path: Path, tiny_teacher: tuple[str, Path], url: str, budget: int) -> list[str]:
    arch, ckpt = tiny_teacher
    space = tmp_path / "remote.yaml"
    space.write_text(REMOTE_SPACE)
    return [sys.executable, "-m", "autokd.cli", "--root", str(tmp_path / "studies"), "search", "--budget", str(budget), "--space", str(space),
            "--teacher", arch, "--teacher-checkpoint", str(ckpt), "--train-limit", "160", "--no-mlflow",
            "--no-prune", "--sampler", "random", "--device", "cpu", "--latency-target", url, "--latency-target-retry", "1"]


def search_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=repo_pythonpath(), AUTOKD_LATENCY_TOKEN=TOKEN)


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
        return json.loads(resp.read())


def load_study(tmp_path: Path):  # noqa: ANN201 - optuna.Study
    import optuna

    from autokd.study.store import make_storage

    return optuna.load_study(study_name="digits-remote", storage=make_storage(None, tmp_path / "studies"))


@pytest.mark.slow
def test_a_search_times_every_student_on_the_server(tmp_path: Path, tiny_teacher: tuple[str, Path]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port)
    try:
        done = subprocess.run(search_cmd(tmp_path, tiny_teacher, url, budget=3), env=search_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        measured = health(url)["measured"]
    finally:
        stop_server(proc)
    study = load_study(tmp_path)
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 3
    assert measured == len({t.user_attrs["arch_key"] for t in trials})  # one measurement per architecture
    assert all(t.user_attrs["latency"]["host"] == url for t in trials)  # the figures came from the server
    settings = study.user_attrs["latency_settings"]
    assert settings["target"] == url and settings["runtime"] == "onnxruntime"
    assert settings["provider"] == "CPUExecutionProvider" and settings["threads"] == 1


@pytest.mark.slow
def test_server_lost_mid_search_fails_that_trial_and_the_study_goes_on(tmp_path: Path,
                                                                        tiny_teacher: tuple[str, Path]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port)
    search = subprocess.Popen(search_cmd(tmp_path, tiny_teacher, url, budget=6), env=search_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    restarted = None
    try:
        deadline = time.monotonic() + 300
        while health(url)["measured"] < 1:  # the first trial has been timed on the server
            assert search.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        server.kill()  # as a machine that goes away: no goodbye
        server.wait()
        while not any(t.state.name == "FAIL" for t in load_study(tmp_path).trials):
            assert search.poll() is None and time.monotonic() < deadline, search.stdout.read()[-3000:]
            time.sleep(0.2)
        restarted = start_server(port)
        out, _ = search.communicate(timeout=600)
        assert search.returncode == 0, out[-3000:]
        measured_after = health(url)["measured"]
    finally:
        for proc in (search, server, restarted):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    trials = sorted(load_study(tmp_path).trials, key=lambda t: t.number)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and all("latency target" in t.user_attrs["fail_reason"] and "unreachable" in
                          t.user_attrs["fail_reason"] for t in failed)
    after = [t for t in trials if t.number > failed[-1].number and t.state.name == "COMPLETE"]
    assert after and measured_after >= 1  # the restarted server timed the trials that followed
    assert all(t.user_attrs["latency"]["host"] == url for t in after)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "FAIL", "PRUNED")]
    assert len(finished) == 6  # the budget counts the failed trials, as for any other failure
