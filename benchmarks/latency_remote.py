"""Benchmark: what timing students on a latency server costs a trial, against timing them locally.

Starts `autokd latency-server` on 127.0.0.1 (a real process, as on a target device) and times the same
architectures, sampled from the default space, with two meters, alternating per architecture so a slow phase
of the host hits both: local (export + ONNX Runtime here) and remote (export + upload + ONNX Runtime on the
server). Prints per-trial seconds of each (median and range), the difference (what a remote target adds on
loopback: HTTP, the upload, a second process), the ONNX sizes, and whether the two agree on the latency.

    python benchmarks/latency_remote.py [--archs 12]

On a real network add the upload time of the model size over that link.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO  # noqa: E402

FAMILIES = ("resnet", "mobilenetv3", "regnet", "convnext", "vit")
TOKEN = "benchmark-token"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "autokd.latency.remote.server", "--port", str(port), "--token", TOKEN],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("latency server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, default=12, help="architectures to time (default 12)")
    args = parser.parse_args()

    import torch

    from autokd.latency.meter import LatencyMeter
    from autokd.latency.remote.client import RemoteTarget
    from autokd.model.students import build_from_spec, resolve_student

    torch.set_num_threads(1)
    rng = random.Random(0)
    specs = [resolve_student(FAMILIES[i % len(FAMILIES)], rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75),
                             num_classes=10, in_chans=1, input_size=16) for i in range(args.archs)]
    port = _free_port()
    server = _start_server(port)
    try:
        local = LatencyMeter("onnxruntime", "cpu", threads=1, batch=1)
        remote = LatencyMeter(threads=1, batch=1, target=RemoteTarget(f"http://127.0.0.1:{port}", TOKEN))
        print(f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
              f"{args.archs} architectures of the default space; local: {local.describe()}; remote: "
              f"{remote.describe()}", flush=True)
        rows = []
        for i, spec in enumerate(specs):
            model = build_from_spec(spec)
            arms = [("local", local), ("remote", remote)]
            if i % 2:
                arms.reverse()  # alternate which goes first
            row = {"arch": spec.key}
            for name, meter in arms:
                t0 = time.perf_counter()
                result = meter._measure_now(spec, model, spec.key)  # what a cache miss costs a trial
                row[name] = time.perf_counter() - t0
                row[f"{name}_ms"] = result.median_ms
            row["onnx_kb"] = len(local.export(model, (1, 16, 16))) / 1024
            rows.append(row)
            print(f"  {spec.key:<28} local {row['local']:.3f} s  remote {row['remote']:.3f} s  "
                  f"latency {row['local_ms']:.4f} / {row['remote_ms']:.4f} ms  onnx {row['onnx_kb']:.0f} kB",
                  flush=True)
    finally:
        server.terminate()
        server.wait()

    def spread(xs: list[float]) -> str:
        return f"median {statistics.median(xs):.3f} s (range {min(xs):.3f}-{max(xs):.3f})"

    added = [r["remote"] - r["local"] for r in rows]
    diffs = [abs(r["remote_ms"] - r["local_ms"]) / r["local_ms"] for r in rows]
    print(f"\nper new architecture: local {spread([r['local'] for r in rows])}; "
          f"remote {spread([r['remote'] for r in rows])}")
    print(f"added by the remote target on loopback: median {statistics.median(added) * 1000:.0f} ms "
          f"(range {min(added) * 1000:.0f} to {max(added) * 1000:.0f} ms); ONNX files "
          f"{min(r['onnx_kb'] for r in rows):.0f}-{max(r['onnx_kb'] for r in rows):.0f} kB")
    print(f"local vs remote latency of the same student (same machine): median difference "
          f"{statistics.median(diffs):.1%}, worst {max(diffs):.1%}")


if __name__ == "__main__":
    main()
