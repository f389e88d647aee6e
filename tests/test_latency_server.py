"""`autokd latency-server` as a real process on 127.0.0.1: contract, security, and its use by a search."""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import pytest
from conftest import free_port, repo_pythonpath
from hostile_onnx import SECRET, conv_net, flip, mutate, reshape_by_hidden_shape, splice, truncate
from onnx import TensorProto, helper, numpy_helper

from autokd.errors import UserError
from autokd.latency.remote.client import TIMEOUT_MARGIN_S, RemoteLatencyError, RemoteTarget, validate_target_url
from autokd.latency.remote.guard import CATEGORIES, DEFAULT_MAX_INPUT_BYTES, EXTERNAL_DATA, external_data_reason
from autokd.latency.remote.server import RUNTIME_FAILURE, LatencyHTTPServer
from autokd.latency.remote.worker import _tiny_model

TOKEN = "s3cret-token"


def matmul_model(size: int = 16) -> onnx.ModelProto:
    """A one-node ONNX model with its weight inside the file."""
    weight = numpy_helper.from_array(np.random.default_rng(0).random((size, size), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def loop_bomb(trips: int = 1 << 62) -> onnx.ModelProto:
    """A few hundred bytes that never finish: a Loop of 2^62 trips carrying its input through."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "", "x"], ["y"], body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.array(trips, dtype=np.int64), "M")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def expand_bomb() -> onnx.ModelProto:
    """About a hundred bytes that ask for 4 GiB: a float broadcast to 2^15 x 2^15 (ConstantOfShape's shape input
    gives the same)."""
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["one"], ["c"],
                          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
         helper.make_node("Mul", ["c", "x"], ["cx"]), helper.make_node("Expand", ["cx", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1 << 15, 1 << 15], dtype=np.int64), "shape"),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def huge_input_model() -> onnx.ModelProto:
    """A tiny file whose input, as declared, takes 2 GiB at batch 1."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1 << 29])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1 << 29])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def start_server(port: int, *extra: str, token: str | None = TOKEN, cwd: Path | None = None,
                 cli: bool = False) -> subprocess.Popen:
    """`python -m autokd.latency.remote.server` (``cli``: `autokd latency-server`) on 127.0.0.1:port, started in
    ``cwd`` (default: the test's), waited for until /health answers. Its output goes to a file
    (``server_log(proc)`` reads it): a pipe nobody reads would fill and stop the server."""
    entry = ["autokd.cli", "latency-server"] if cli else ["autokd.latency.remote.server"]
    cmd = [sys.executable, "-m", *entry, "--port", str(port), *extra]
    if token is not None:
        cmd += ["--token", token]
    env = dict(os.environ, PYTHONPATH=repo_pythonpath())
    log_path = Path(tempfile.mkdtemp(prefix="latency-server-log-")) / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    proc.log_path = log_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"latency server exited with {proc.returncode}: {server_log(proc)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("latency server did not answer /health within 60 s")


def server_log(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


#: The limits of the module's server: small, so that a hostile model is stopped in seconds.
MAX_BYTES, MEASURE_S, MEMORY_MB, CONNECTIONS = 200000, 5, 768, 16


@pytest.fixture(scope="module")
def server_proc() -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    proc = start_server(port, "--max-bytes", str(MAX_BYTES), "--max-measure-seconds", str(MEASURE_S),
                        "--max-memory-mb", str(MEMORY_MB), "--max-connections", str(CONNECTIONS))
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_server(proc)


@pytest.fixture()
def server(server_proc: tuple[str, subprocess.Popen]) -> str:
    return server_proc[0]


def post(url: str, body: bytes, token: str | None = TOKEN, query: str = "batch=1&threads=1",
         timeout: float = 120.0) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{url}/measure?{query}", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
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


def test_body_over_the_limit_is_413_and_the_client_sees_it(server: str) -> None:
    # 20 MB: far more than the socket buffers hold, so the client is still sending when the server answers.
    big = matmul_model(size=2300).SerializeToString()
    assert len(big) > 20_000_000
    status, payload = post(server, big)
    assert status == 413 and "200000" in payload["error"] and "--max-bytes" in payload["error"]
    # The search's client, not knowing the limit yet, gets the same answer (not "unreachable"), without retries.
    with pytest.raises(RemoteLatencyError, match=r"answered 413: .*200000 bytes \(--max-bytes\)"):
        RemoteTarget(server, TOKEN, retry_delays_s=(60.0,)).measure(big, 1, 1)
    # Once it knows the limit (GET /signature), it refuses the file itself.
    target = RemoteTarget(server, TOKEN)
    target.check(threads=1)
    with pytest.raises(RemoteLatencyError, match=r"over latency target .* limit of 200000 bytes .*not uploaded"):
        target.measure(big, 1, 1)


def test_a_file_that_is_not_onnx_is_400_with_its_reason(server: str) -> None:
    status, payload = post(server, b"this is not an onnx model" * 10)
    assert status == 400 and "ONNX" in payload["error"] and payload["category"] == "malformed"
    # A well-formed protobuf that ONNX Runtime still cannot load: a fixed reason, never ONNX Runtime's own text
    # (it can quote what the runtime read on the server); the details go to the server's log.
    status, payload = post(server, helper.make_model(helper.make_graph([], "empty", [], [])).SerializeToString())
    assert status == 400 and payload == {"error": RUNTIME_FAILURE, "category": "runtime"}


def test_signature_tells_the_limits_and_the_client_times_out_from_them(server: str) -> None:
    target = RemoteTarget(server, TOKEN)
    target.check(threads=1)
    assert target.limits == {"max_bytes": MAX_BYTES, "max_input_bytes": DEFAULT_MAX_INPUT_BYTES,
                             "max_measure_seconds": MEASURE_S, "max_memory_mb": MEMORY_MB}
    # One try waits for the request's turn (at most one measurement) and its own measurement, then a margin.
    assert target.try_timeout_s() == 2 * MEASURE_S + TIMEOUT_MARGIN_S


def test_a_model_that_runs_for_ever_is_stopped_at_the_time_limit(server: str) -> None:
    bomb = loop_bomb().SerializeToString()
    assert len(bomb) < 400
    status, payload = post(server, bomb, timeout=MEASURE_S + TIMEOUT_MARGIN_S)  # answered within the limit
    assert status == 422 and payload["category"] == "time-limit"
    assert f"{MEASURE_S} s time limit (--max-measure-seconds)" in payload["error"]
    # The measuring process was replaced: the next model is measured.
    status, payload = post(server, matmul_model().SerializeToString())
    assert status == 200 and payload["result"]["median_ms"] > 0


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the server's measuring process)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def status_mib(pid: int, field: str) -> float:
    """A memory figure of /proc/<pid>/status (VmRSS, VmHWM, ...) in MiB; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def test_a_model_that_allocates_without_bound_is_stopped_at_the_memory_limit(
        server_proc: tuple[str, subprocess.Popen]) -> None:
    url, proc = server_proc
    bomb = expand_bomb().SerializeToString()
    assert len(bomb) < 300
    peak = {"worker": 0.0}
    done = threading.Event()

    def sample() -> None:  # the measuring process's resident memory while it runs the model
        while not done.is_set():
            for pid in child_pids(proc.pid):
                peak["worker"] = max(peak["worker"], status_mib(pid, "VmRSS"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        status, payload = post(url, bomb)
    finally:
        done.set()
        sampler.join()
    assert status == 422 and payload["category"] in ("memory-limit", "time-limit"), payload
    assert "--max-memory-mb" in payload["error"] or "--max-measure-seconds" in payload["error"]
    assert peak["worker"] <= MEMORY_MB
    assert status_mib(proc.pid, "VmHWM") < 200  # the server itself never holds a model's tensors
    status, payload = post(url, matmul_model().SerializeToString())
    assert status == 200


def test_a_declared_input_over_the_limit_is_refused_before_it_is_built(
        server_proc: tuple[str, subprocess.Popen]) -> None:
    url, proc = server_proc
    model = huge_input_model().SerializeToString()
    assert len(model) < 200
    status, payload = post(url, model)
    assert status == 400 and payload["category"] == "input-too-large" and "--max-input-mb" in payload["error"]
    assert all(status_mib(pid, "VmHWM") < 1024 for pid in child_pids(proc.pid))  # 2 GiB were never allocated
    assert status_mib(proc.pid, "VmHWM") < 200


def test_idle_connections_are_capped_and_a_request_gets_through_after_them(
        server_proc: tuple[str, subprocess.Popen]) -> None:
    url, proc = server_proc
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(300)]
    try:
        threads = []
        for _ in range(20):  # the server accepts them all (turning most away), whatever the machine's speed
            threads.append(int(next(line.split()[1] for line in Path(f"/proc/{proc.pid}/status").read_text()
                                    .splitlines() if line.startswith("Threads:"))))
            time.sleep(0.05)
        assert max(threads) <= CONNECTIONS + 4  # a thread per served connection, the main and the lingering one
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
                answered = resp.status, ""
        except urllib.error.HTTPError as exc:
            answered = exc.code, json.loads(exc.read())["error"]
        assert answered[0] == 200 or (answered[0] == 503 and "--max-connections" in answered[1]), answered
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 30
    while True:  # the served ones see their client leave and free their slots
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
                assert resp.status == 200
                break
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and time.monotonic() < deadline
            time.sleep(0.1)
    assert post(url, matmul_model().SerializeToString())[0] == 200


def test_server_and_measuring_process_run_in_empty_directories(server_proc: tuple[str, subprocess.Popen]) -> None:
    url, proc = server_proc
    assert post(url, matmul_model().SerializeToString())[0] == 200
    workers = child_pids(proc.pid)
    assert workers
    dirs = [Path(os.readlink(f"/proc/{pid}/cwd")) for pid in (proc.pid, *workers)]
    assert len(set(dirs)) == len(dirs) and Path.cwd() not in dirs
    assert all(d.is_dir() and not any(d.iterdir()) for d in dirs), dirs


def test_a_client_that_leaves_early_leaves_no_traceback_and_sigterm_exits_0() -> None:
    port = free_port()
    proc = start_server(port)
    url = f"http://127.0.0.1:{port}"
    try:
        body = matmul_model().SerializeToString()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST /measure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            # Gone before the answer, with a reset (SO_LINGER 0), as a killed client.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        deadline = time.monotonic() + 60
        while "left before the answer" not in server_log(proc):
            assert time.monotonic() < deadline and proc.poll() is None, server_log(proc)
            time.sleep(0.1)
        assert health(url)["measured"] == 1
    finally:
        stop_server(proc)
    log = server_log(proc)
    assert proc.returncode == 0, log
    assert "Traceback" not in log and log.count("left before the answer") == 1, log


def test_sigterm_mid_measurement_of_a_hung_model_exits_0_and_kills_the_measuring_process() -> None:
    port = free_port()
    proc = start_server(port)  # the default time limit (60 s): the model is still running when SIGTERM comes
    url = f"http://127.0.0.1:{port}"
    client = threading.Thread(target=lambda: post(url, loop_bomb().SerializeToString()), daemon=True)
    client.start()
    deadline = time.monotonic() + 60
    while not health(url)["busy"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers = child_pids(proc.pid)
    assert workers
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = server_log(proc)
    assert code == 0, log
    assert "terminate called" not in log and "Traceback" not in log, log
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_a_memory_limit_below_onnx_runtimes_footprint_is_refused_at_start() -> None:
    env = dict(os.environ, PYTHONPATH=repo_pythonpath())
    done = subprocess.run([sys.executable, "-m", "autokd.latency.remote.server", "--port", str(free_port()),
                           "--max-memory-mb", "64"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--max-memory-mb 64 is too small" in done.stderr and "MiB" in done.stderr


def test_the_self_test_model_of_the_measuring_process_is_valid_onnx() -> None:
    model = onnx.load_from_string(_tiny_model())
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Identity"]


def test_a_model_with_external_data_is_refused(server: str, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(matmul_model(), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    body = path.read_bytes()
    assert external_data_reason(body) is not None
    status, payload = post(server, body)
    assert status == 400 and "external data" in payload["error"] and payload["category"] == "external-data"
    assert external_data_reason(matmul_model().SerializeToString()) is None


def raw_exchange(url: str, body: bytes, batch: int, timeout: float) -> bytes:
    """POST ``body`` to /measure over a plain socket and return every byte of the reply: status line, headers and
    body, as the server sent them."""
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(f"POST /measure?batch={batch}&threads=1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}"
                     f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def echoes_of(secret: bytes) -> list[bytes]:
    """The forms in which a file's bytes could come back in a reply: the bytes, each half, hex, base64, and the
    numbers they make as int64 (both byte orders, as a shape ONNX Runtime prints), int32 and single bytes."""
    numbers = [*np.frombuffer(secret, dtype="<i8"), *np.frombuffer(secret, dtype=">i8"),
               *np.frombuffer(secret, dtype="<i4"), *np.frombuffer(secret, dtype="<u8")]
    byte_lists = [sep.join(str(b) for b in secret[:6]) for sep in (",", ", ", " ")]
    return [secret, secret[:8], secret[8:], secret.hex().encode(), secret.hex().upper().encode(),
            base64.b64encode(secret), *(str(int(n)).encode() for n in numbers), *(t.encode() for t in byte_lists)]


def test_the_external_data_attack_over_http_gets_400_and_never_a_byte_of_the_file(tmp_path: Path) -> None:
    """The attack end to end: `autokd latency-server` started in a folder that holds a secret; models whose int64
    Reshape shape reads that file (by a relative and an absolute path; behind 5-byte tags with bit 32 set, which
    ONNX Runtime's protobuf truncates, and behind plain tags). Each is 400 with a category and the reply (status,
    headers, body) holds the file's bytes in no form; the server then measures a valid model."""
    secret_dir = tmp_path / "secret_dir"
    secret_dir.mkdir()
    secret = secret_dir / "secret.txt"
    secret.write_bytes(SECRET)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, cwd=secret_dir, cli=True)
    attacks = {
        "over-long tags": reshape_by_hidden_shape(location="secret.txt"),
        "plain tags": reshape_by_hidden_shape(location="secret.txt", tag_bits=0),
        "absolute path, over-long tags": reshape_by_hidden_shape(location=str(secret)),
        "absolute path, plain tags": reshape_by_hidden_shape(location=str(secret), tag_bits=0),
    }
    echoes = echoes_of(SECRET)
    try:
        for name, body in attacks.items():
            # Batch 2: the input's declared first dimension, so that ONNX Runtime would get as far as the Reshape.
            reply = raw_exchange(url, body, batch=2, timeout=MEASURE_S + TIMEOUT_MARGIN_S)
            head, _, payload_bytes = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), (name, reply)
            payload = json.loads(payload_bytes)
            assert set(payload) == {"error", "category"} and payload["category"] in CATEGORIES, (name, payload)
            if "plain" in name:  # over-long tags may already fail the parse (malformed)
                assert payload["category"] == EXTERNAL_DATA, (name, payload)
            leaked = [echo for echo in echoes if echo in reply]
            assert not leaked, (name, leaked, reply)
        status, payload = post(url, matmul_model().SerializeToString())
        assert status == 200 and payload["result"]["median_ms"] > 0
    finally:
        stop_server(proc)
    log = server_log(proc).encode()
    assert not [echo for echo in echoes if echo in log]  # ONNX Runtime never read the file, even for the log
    assert secret.read_bytes() == SECRET


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
    for option in ("--max-measure-seconds", "--max-memory-mb", "--max-input-mb", "--max-connections"):
        assert option in helps[0]
    assert vars(standalone([])) == {k: v for k, v in vars(subcommand([])).items() if k not in ("command", "root")}
    for parse in (standalone, subcommand):
        for option in ("--max-bytes", "--max-measure-seconds", "--max-memory-mb", "--max-connections"):
            code, err = run(parse, [option, "0"])
            assert code == 2 and "'0' must be >= 1" in err


def test_the_server_imports_neither_torch_nor_timm_nor_onnxruntime() -> None:
    """The server process needs neither torch nor timm, and ONNX Runtime runs only in its measuring process."""
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
        "srv.server_close()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision', 'onnxruntime'))\n"
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
# Damaged models through a real server
# ---------------------------------------------------------------------------------------------------------

#: The fuzzed server's limits: a damaged model that hangs or allocates is stopped quickly.
FUZZ_MEASURE_S, FUZZ_MEMORY_MB, FUZZ_INPUT_MB = 3, 768, 16
FUZZ_UPLOADS = 200
#: How far the server's and its measuring process's resident memory may grow over their baseline.
FUZZ_MEMORY_GROWTH_MIB = 200


def damage(body: bytes, donor: bytes, rng: random.Random) -> bytes:
    """``body`` damaged one way, at random: bytes flipped in place (the damage that most often still parses and
    reaches ONNX Runtime), edited (inserted, deleted, over-long tags), cut short, or spliced with ``donor``."""
    kind = rng.random()
    if kind < 0.4:
        return flip(body, rng)
    if kind < 0.6:
        return mutate(body, rng)
    if kind < 0.8:
        return truncate(body, rng)
    return splice(body, donor, rng)


def exchange(url: str, body: bytes, timeout: float) -> tuple[int, dict]:
    """POST ``body`` to /measure on a new connection: (status, JSON payload). A dropped connection, a reply that is
    not JSON or no reply within ``timeout`` raises."""
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/measure?batch=1&threads=1", body=body, headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def resident_mib(server_pid: int) -> dict[str, float]:
    """VmRSS of the server and of its measuring process(es), in MiB."""
    workers = [status_mib(pid, "VmRSS") for pid in child_pids(server_pid)]
    return {"server": status_mib(server_pid, "VmRSS"), "worker": max(workers, default=0.0)}


@pytest.mark.slow
def test_damaged_models_are_answered_200_or_4xx_and_the_server_stays_bounded() -> None:
    """Seeded damage to a valid model (flipped bytes, edits, truncations, splices), with a model that never ends and
    one that allocates without bound among them, each uploaded to one real server with small limits: every upload
    gets an answer within the time limit plus the client's margin, 200 or a 4xx with a category (or a clean 503
    busy), never another 5xx or a dropped connection; afterwards /health answers, the server and its measuring
    process have stayed within a bound over their resident memory after a first valid measurement, one measuring
    process is left, and a valid model is measured."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, "--max-measure-seconds", str(FUZZ_MEASURE_S), "--max-memory-mb", str(FUZZ_MEMORY_MB),
                        "--max-input-mb", str(FUZZ_INPUT_MB))
    valid, donor = conv_net().SerializeToString(), matmul_model().SerializeToString()
    rng = random.Random(2026_12_22)
    answers: dict[tuple[int, str], int] = {}
    try:
        assert exchange(url, valid, timeout=FUZZ_MEASURE_S + TIMEOUT_MARGIN_S)[0] == 200
        baseline = resident_mib(proc.pid)
        bound = {name: mib + FUZZ_MEMORY_GROWTH_MIB for name, mib in baseline.items()}
        peak = dict(baseline)
        uploads = [damage(valid, donor, rng) for _ in range(FUZZ_UPLOADS)]
        # The measuring process killed and replaced mid-fuzz: the bounds hold for its successors too.
        uploads[FUZZ_UPLOADS // 3:FUZZ_UPLOADS // 3] = [loop_bomb().SerializeToString()]
        uploads[2 * FUZZ_UPLOADS // 3:2 * FUZZ_UPLOADS // 3] = [expand_bomb().SerializeToString()]
        for number, body in enumerate(uploads):
            try:
                status, payload = exchange(url, body, timeout=FUZZ_MEASURE_S + TIMEOUT_MARGIN_S)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                pytest.fail(f"upload {number} ({body.hex()}) got no answer: {exc!r}\n{server_log(proc)[-3000:]}")
            category = payload.get("category", "") if status != 200 else ""
            assert (status == 200 and payload["result"]["median_ms"] > 0
                    or 400 <= status < 500 and set(payload) == {"error", "category"}
                    or status == 503 and category == "busy"), (number, body.hex(), status, payload)
            answers[status, category] = answers.get((status, category), 0) + 1
            for name, mib in resident_mib(proc.pid).items():
                peak[name] = max(peak[name], mib)
        assert health(url)["status"] == "ok"
        for name, mib in resident_mib(proc.pid).items():
            peak[name] = max(peak[name], mib)
        assert all(peak[name] <= bound[name] for name in bound), (baseline, peak)
        assert status_mib(proc.pid, "VmHWM") <= bound["server"]  # also between the samples
        assert len(child_pids(proc.pid)) == 1  # each killed measuring process was reaped, none left behind
        status, payload = exchange(url, valid, timeout=FUZZ_MEASURE_S + TIMEOUT_MARGIN_S)
        assert status == 200 and payload["result"]["median_ms"] > 0
    finally:
        stop_server(proc)
    # Every path was taken: uploads refused by the guard, run by ONNX Runtime, and stopped at a limit.
    assert answers.get((400, "malformed")) and answers.get((200, "")), answers
    assert sum(n for (status, _), n in answers.items() if status == 422) == 2, answers
    assert proc.returncode == 0 and "Traceback" not in server_log(proc), server_log(proc)[-3000:]


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
