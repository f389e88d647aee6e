"""`autokd ui` tells the UI's address only once the server answers, once; a server that never answers or dies while
starting ends the command with exit 1 and the server's own last words. The server here is a stand-in for MLflow's:
a real process serving real HTTP on a real port, only slower to listen (autokd.tracking.ui_command is replaced)."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from conftest import free_port

from autokd.cli import main
from autokd.tracking.ui import port_in_use

# argv: PORT CONTROL_DIR. The mode is in CONTROL_DIR/mode: serve (the default) listens after a pause, writes `answered`
# before each answer and exits once `stop` exists; die prints a message and exits 3; mute never listens.
FAKE_UI = r"""
import http.server, os, sys, time
from pathlib import Path

port, ctl = int(sys.argv[1]), Path(sys.argv[2])
mode = (ctl / "mode").read_text() if (ctl / "mode").exists() else "serve"
(ctl / "pid").write_text(str(os.getpid()))
print("fake ui: starting", flush=True)
if mode == "die":
    print("fake ui: cannot open the store", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "mute":
    time.sleep(600)
time.sleep(1.0)  # slow to listen, as MLflow is: whoever polls too early finds no server


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        (ctl / "answered").touch()  # before the answer leaves
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        print("fake ui: GET", self.path, flush=True)


server = http.server.HTTPServer(("127.0.0.1", port), Health)
server.timeout = 0.1
while not (ctl / "stop").exists():
    server.handle_request()
"""


@pytest.fixture()
def fake_ui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """The control directory of the stand-in server, and the argv to run `autokd ui` against it."""
    script = tmp_path / "fake_ui.py"
    script.write_text(FAKE_UI)
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    monkeypatch.setattr("autokd.tracking.ui_command",
                        lambda uri, host, port: [sys.executable, str(script), str(port), str(ctl)])
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--root", str(tmp_path / "studies"), "ui", "--tracking-uri", store, "--port", str(free_port())]
    return ctl, argv


class _Stdout:
    """sys.stdout for one `autokd ui`: records, for each line with the address, whether the server had answered
    when it was printed; then asks the stand-in to stop, which ends the command."""

    def __init__(self, ctl: Path, url: str) -> None:
        self.ctl, self.url, self.text, self.answered_then = ctl, url, "", []

    def write(self, text: str) -> int:
        self.text += text
        if self.url in text:
            self.answered_then.append((self.ctl / "answered").exists())
            (self.ctl / "stop").touch()
        return len(text)

    def flush(self) -> None:
        pass


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_address_is_printed_once_the_server_answers_and_only_once(
        fake_ui: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ctl, argv = fake_ui
    url = f"http://127.0.0.1:{argv[-1]}/"
    out = _Stdout(ctl, url)
    monkeypatch.setattr(sys, "stdout", out)
    assert main(argv) == 0  # the stand-in exits 0 once asked to stop
    assert out.answered_then == [True], out.text  # printed once, after the server had answered
    assert out.text.count("http://") == 1
    assert "starting the MLflow UI" in capsys.readouterr().err  # what it does meanwhile: no address there
    assert _gone(int((ctl / "pid").read_text()))


def test_a_server_that_dies_while_starting_exits_1_with_its_output(
        fake_ui: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    ctl, argv = fake_ui
    (ctl / "mode").write_text("die")
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "http://" not in out
    assert "exited with code 3 before answering" in err
    assert "fake ui: starting" in err and "fake ui: cannot open the store" in err  # its output's tail


def test_a_server_that_never_answers_is_given_up_and_stopped(
        fake_ui: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    ctl, argv = fake_ui
    (ctl / "mode").write_text("mute")
    assert main([*argv, "--start-timeout", "1"]) == 1
    out, err = capsys.readouterr()
    assert "http://" not in out
    assert "did not answer" in err and "within 1 s" in err and "--start-timeout" in err
    assert "fake ui: starting" in err
    assert _gone(int((ctl / "pid").read_text()))  # its process group was stopped


def test_a_port_already_taken_is_refused_before_starting(
        fake_ui: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    ctl, argv = fake_ui
    port = int(argv[-1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert port_in_use("127.0.0.1", port)
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: something already listens" in err
    assert not (ctl / "pid").exists()  # nothing was started
    assert not port_in_use("127.0.0.1", port)
