"""GPU benchmark: how well small-student trials fill one GPU. One command, no network, under ~7 minutes.

    python benchmarks/gpu.py                      # on cuda (device 0 of those visible)
    python benchmarks/gpu.py --device cpu --quick # smoke test on the CPU (tiny sizes, compiled arms skipped)

Sections, each with a time cap, printed (and flushed) as they finish, so a killed run still says something:

1. **Images/s** of a typical student (resnet width 0.5 depth 0.5, 3x32x32 CIFAR-shaped synthetic tensors, 10
   classes, KD from cached teacher logits: throughput does not depend on the pixels) through
   `autokd.train.distill` itself, at batch 64 and 256: fp32 versus bf16 autocast, eager versus
   `torch.compile` (default mode) versus `torch.compile(mode="reduce-overhead")` (CUDA graphs). The first
   epochs of an arm are warm-up (compilation, graph capture, cuDNN autotuning) and are not timed.
2. **Achieved fraction of peak bf16 FLOP/s**: the student's training FLOPs per image (forward + backward,
   counted by `torch.utils.flop_counter`; about 6x its MACs) times images/s, over the GPU's dense bf16 peak
   (looked up by GPU name, or `--peak-tflops`).
3. **Trials per minute** of a real `autokd search` on digits (default space, `--no-prune`, random sampler,
   `--no-mlflow`) with `--jobs-per-device` 1, 2 and 4 on one GPU (on the CPU: `--jobs` 1 and 2), counted over
   a fixed window once every worker has started.
4. **GPU utilisation**, sampled through NVML (`nvidia-ml-py`) every 0.2 s during each arm: mean and peak
   kernel-busy percentage and peak memory; said so when NVML is not there.

`--out DIR` (default `$OUT` when set) also gets `gpu_bench.json` with every figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

STARTED = time.perf_counter()

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; first matching name wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4), ("H100", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("RTX 4090", 165.2), ("A6000", 154.8),
)


def say(text: str = "") -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {text}" if text else "", flush=True)


# ----------------------------------------------------------------------------------------------------------
# GPU utilisation (NVML)
# ----------------------------------------------------------------------------------------------------------

class Utilisation:
    """Samples the GPU's busy percentage and memory every `period` s in a thread; `window(t0, t1)` sums up."""

    def __init__(self, device: torch.device, period: float = 0.2) -> None:
        self.samples: list[tuple[float, int, float]] = []  # (time, util %, memory used MiB)
        self.note = ""
        self._stop = threading.Event()
        self._handle = None
        if device.type != "cuda":
            self.note = "not sampled: CPU run"
            return
        try:
            import pynvml  # from nvidia-ml-py
        except ImportError:
            self.note = "not sampled: nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = self._find_handle(pynvml, device)
        except Exception as exc:  # noqa: BLE001 - a benchmark without utilisation is still useful
            self.note = f"not sampled: NVML failed ({type(exc).__name__}: {exc})"
            return
        self.note = f"NVML, every {period} s"
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    @staticmethod
    def _find_handle(pynvml: Any, device: torch.device) -> Any:
        # NVML numbers GPUs by PCI order and ignores CUDA_VISIBLE_DEVICES: match the torch device's PCI address.
        props = torch.cuda.get_device_properties(device)
        try:
            bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
        except Exception:  # noqa: BLE001 - older torch without PCI ids: the only GPU, or device 0
            return pynvml.nvmlDeviceGetHandleByIndex(0)

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
                mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
                self.samples.append((time.perf_counter(), int(util), mem))
            except Exception:  # noqa: BLE001
                pass
            self._stop.wait(period)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        got = [s for s in self.samples if t0 <= s[0] <= t1]
        if not got:
            return {"note": self.note or "no samples"}
        return {"util_mean": round(sum(s[1] for s in got) / len(got), 1), "util_max": max(s[1] for s in got),
                "mem_max_mib": round(max(s[2] for s in got)), "samples": len(got)}

    def stop(self) -> None:
        self._stop.set()


def fmt_util(u: dict[str, Any]) -> str:
    if "util_mean" not in u:
        return f"GPU util {u['note']}"
    return f"GPU util mean {u['util_mean']:.0f} % (max {u['util_max']} %), memory max {u['mem_max_mib']} MiB"


# ----------------------------------------------------------------------------------------------------------
# 1-2. images/s and fraction of peak
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Sizes:
    n_train: int
    batches: tuple[int, ...]
    input_size: int
    warmup_epochs: int
    timed_s: float  # timed epochs run until at least this long
    throughput_cap_s: float  # section 1
    arm_cap_s: float  # one arm
    search_window_s: float
    search_arm_cap_s: float
    search_cap_s: float  # section 3
    jobs: tuple[int, ...]
    compile: bool


GPU_SIZES = Sizes(n_train=16384, batches=(64, 256), input_size=32, warmup_epochs=2, timed_s=2.0,
                  throughput_cap_s=170, arm_cap_s=60, search_window_s=25, search_arm_cap_s=70, search_cap_s=200,
                  jobs=(1, 4, 2), compile=True)  # 4 before 2: the section cap may cut the last
QUICK_SIZES = Sizes(n_train=256, batches=(16, 64), input_size=16, warmup_epochs=1, timed_s=0.5,
                    throughput_cap_s=60, arm_cap_s=20, search_window_s=15, search_arm_cap_s=90, search_cap_s=200,
                    jobs=(1, 2), compile=False)


class _Enough(Exception):
    pass


def synthetic_data(n: int, size: int, device: torch.device) -> Any:
    from autokd.model.data import DataSplits

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataSplits(name="synthetic", x_train=x, y_train=y, x_val=x[:64], y_val=y[:64], x_test=x[:64],
                      y_test=y[:64], num_classes=10, in_chans=3, input_size=size,
                      class_names=[str(i) for i in range(10)], mean=(0.0,) * 3, std=(1.0,) * 3,
                      fingerprint="synthetic").to(device)


def typical_student(size: int) -> Any:
    from autokd.model.students import build_from_spec, resolve_student

    torch.manual_seed(0)
    return build_from_spec(resolve_student("resnet", 0.5, 0.5, num_classes=10, in_chans=3, input_size=size))


def train_flops_per_image(size: int, device: torch.device) -> tuple[float, float]:
    """(forward MACs, forward + backward FLOPs) of one image of the typical student, by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = typical_student(size).to(device)
    x = torch.randn(8, 3, size, size, device=device)
    with FlopCounterMode(display=False) as fwd:
        out = model(x)
    forward = fwd.get_total_flops()
    with FlopCounterMode(display=False) as bwd:
        out.float().sum().backward()
    return forward / 2 / 8, (forward + bwd.get_total_flops()) / 8


def throughput_arm(device: torch.device, sizes: Sizes, batch: int, amp: bool, compile: bool | str,
                   cap_s: float) -> dict[str, Any]:
    """Images/s of `distill` on synthetic data: warm-up epochs, then timed epochs for at least `timed_s`; the
    arm stops at the first epoch end after `cap_s`."""
    from autokd.model.losses import build_loss
    from autokd.model.teacher import CachedTeacherOutputs
    from autokd.model.train import EpochResult, TrainConfig, distill

    if compile:
        torch.compiler.reset()  # every arm compiles afresh, for its own batch size (no dynamic-shape reuse)
    data = synthetic_data(sizes.n_train, sizes.input_size, device)
    teacher = CachedTeacherOutputs(torch.randn(1, sizes.n_train, 10, device=device))
    cfg = TrainConfig(epochs=10_000, batch_size=batch, lr=0.01, device=str(device), amp=amp, compile=compile)
    seen: list[EpochResult] = []
    started = time.perf_counter()

    def on_epoch(r: EpochResult) -> None:
        seen.append(r)
        timed = seen[sizes.warmup_epochs:]
        if sum(e.seconds for e in timed) >= sizes.timed_s and len(timed) >= 2:
            raise _Enough
        if time.perf_counter() - started > cap_s:
            raise _Enough

    try:
        distill(typical_student(sizes.input_size), build_loss("kd", alpha=0.9, temperature=4.0), data, cfg,
                teacher=teacher, on_epoch=on_epoch)
    except _Enough:
        pass
    timed = seen[sizes.warmup_epochs:]
    warm_s = sum(e.seconds for e in seen[:sizes.warmup_epochs])
    if not timed:
        return {"error": f"time cap: warm-up alone took over {cap_s:.0f} s", "warmup_s": warm_s}
    seconds = sum(e.seconds for e in timed)
    return {"images_per_s": sizes.n_train * len(timed) / seconds, "timed_epochs": len(timed), "timed_s": seconds,
            "warmup_s": warm_s, "ms_per_step": 1000 * seconds / (len(timed) * math.ceil(sizes.n_train / batch))}


def section_throughput(device: torch.device, sizes: Sizes, util: Utilisation, results: dict[str, Any],
                       only: Callable[[dict[str, Any]], bool]) -> None:
    cuda = device.type == "cuda"
    b_small, b_large = sizes.batches
    # Priority order, as the section cap may cut the list short: the cheap eager arms, compiled bf16, then
    # compiled fp32.
    arms = [
        (b_small, False, False), (b_small, True, False), (b_large, False, False), (b_large, True, False),
        (b_large, True, True), (b_large, True, "reduce-overhead"), (b_small, True, "reduce-overhead"),
        (b_small, True, True), (b_large, False, True), (b_small, False, True),
    ]
    section_started = time.perf_counter()
    table = results.setdefault("throughput", [])
    for batch, amp, compile in arms:
        spec = {"batch": batch, "dtype": "bf16" if amp else "fp32",
                "mode": {False: "eager", True: "compiled"}.get(compile, f"compiled {compile}")}
        if not only(spec):
            continue
        label = f"batch {batch:>3} {spec['dtype']} {spec['mode']:<26}"
        left = sizes.throughput_cap_s - (time.perf_counter() - section_started)
        need = 20.0 if compile else 8.0
        if compile and not sizes.compile:
            say(f"  {label} skipped: compiled arms are off in --quick on the CPU")
            continue
        if compile == "reduce-overhead" and not cuda:
            say(f"  {label} skipped: CUDA graphs need a GPU")
            continue
        if left < need:
            say(f"  {label} skipped: section time cap ({sizes.throughput_cap_s:.0f} s) reached")
            table.append({**spec, "skipped": "time cap"})
            continue
        t0 = time.perf_counter()
        try:
            row = throughput_arm(device, sizes, batch, amp, compile, cap_s=min(sizes.arm_cap_s, left))
        except Exception as exc:  # noqa: BLE001 - one arm failing (e.g. no compiler) must not end the benchmark
            row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        row.update(spec, util=util.window(t0, time.perf_counter()))
        table.append(row)
        if "images_per_s" in row:
            say(f"  {label} {row['images_per_s']:>10.0f} images/s  ({row['ms_per_step']:.2f} ms/step, warm-up "
                f"{row['warmup_s']:.1f} s; {fmt_util(row['util'])})")
        else:
            say(f"  {label} failed: {row['error']}")
        if cuda:
            torch.cuda.empty_cache()


def section_peak(device: torch.device, sizes: Sizes, results: dict[str, Any], peak_tflops: float | None) -> None:
    macs, flops = train_flops_per_image(sizes.input_size, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_tflops
    source = "--peak-tflops"
    if peak is None:
        peak = next((p for key, p in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)
        source = f"data sheet, {name}"
    say(f"  typical student: {macs / 1e6:.2f} M MACs per image forward, {flops / 1e6:.1f} MFLOP per image "
        f"trained (forward + backward, {flops / (2 * macs):.1f}x the forward FLOPs)")
    out = {"macs_per_image": macs, "train_flops_per_image": flops, "peak_bf16_tflops": peak, "peak_source": source}
    if peak is None:
        say(f"  peak bf16 FLOP/s of {name!r} unknown: pass --peak-tflops to get the fraction")
    rows = []
    for row in results.get("throughput", []):
        if "images_per_s" not in row:
            continue
        achieved = row["images_per_s"] * flops / 1e12
        frac = achieved / peak if peak else None
        rows.append({"batch": row["batch"], "dtype": row["dtype"], "mode": row["mode"], "tflops": achieved,
                     "fraction_of_bf16_peak": frac})
        say(f"  batch {row['batch']:>3} {row['dtype']} {row['mode']:<26} {achieved:8.3f} TFLOP/s"
            + (f" = {100 * frac:.2f} % of {peak:.0f} TFLOP/s bf16 peak ({source})" if frac is not None else ""))
    out["arms"] = rows
    results["peak"] = out


# ----------------------------------------------------------------------------------------------------------
# 3. trials per minute of a real search
# ----------------------------------------------------------------------------------------------------------

# Workers share one stdout: a line may be split by another worker's, so these match anywhere in a line.
_PROGRESS = re.compile(r"\[\s*\d+/\d+\] #\s*\d+\s")
_READY = re.compile(r"worker (\d+) of (\d+):")


@dataclass
class SearchRun:
    lines: list[tuple[float, str]] = field(default_factory=list)


def _search_cmd(root: Path, device: torch.device, study: str, budget: int, jobs: int, quick: bool,
                seed: int) -> list[str]:
    cmd = [sys.executable, "-m", "autokd.cli", "--root", str(root), "search", "--study", study, "--budget",
           str(budget), "--space", str(REPO / "search_spaces" / "default.yaml"), "--no-mlflow", "--no-prune",
           "--sampler", "random", "--seed", str(seed)]
    if device.type == "cuda":
        cmd += ["--device", "cuda", "--devices", str(device.index or 0), "--jobs-per-device", str(jobs)]
    else:
        cmd += ["--device", "cpu", "--jobs", str(jobs)]
    if quick:
        cmd += ["--train-limit", "160"]
    return cmd


def _start(cmd: list[str], log_path: Path) -> tuple[subprocess.Popen, SearchRun]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive when written: their arrival times mark worker start-up
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)  # own process group: stopped with its workers
    run = SearchRun()

    def pump() -> None:
        with open(log_path, "a") as log:
            for line in proc.stdout:  # type: ignore[union-attr]
                run.lines.append((time.perf_counter(), line.rstrip("\n")))
                log.write(line)
                log.flush()

    threading.Thread(target=pump, daemon=True).start()
    return proc, run


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def search_arm(root: Path, device: torch.device, sizes: Sizes, jobs: int, quick: bool, util: Utilisation,
               log_path: Path) -> dict[str, Any]:
    """Runs a search until `search_window_s` have passed since every worker started; trials/min in that window."""
    proc, run = _start(_search_cmd(root, device, f"bench-jobs{jobs}", 100_000, jobs, quick, seed=jobs), log_path)
    started = time.perf_counter()
    window_start = None
    try:
        while time.perf_counter() - started < sizes.search_arm_cap_s:
            time.sleep(0.2)
            if proc.poll() is not None:
                break
            done = [t for t, line in list(run.lines) if _PROGRESS.search(line)]
            ready = {int(m.group(1)) for _, line in list(run.lines) if (m := _READY.search(line))}
            if window_start is None and done and (jobs == 1 or len(ready) >= jobs):
                window_start = time.perf_counter()
                window_wall = time.time()
            if window_start is not None and time.perf_counter() - window_start >= sizes.search_window_s:
                break
    finally:
        window_end, window_wall_end = time.perf_counter(), time.time()
        _stop(proc)
    if window_start is None:
        tail = "\n".join(line for _, line in run.lines[-15:])
        return {"error": f"no trial finished with all {jobs} workers up within {sizes.search_arm_cap_s:.0f} s "
                         f"(exit {proc.returncode}); last output:\n{tail}"}
    # Trials that finished inside the window, by the study's own completion times (the Optuna journal).
    import optuna

    from autokd.study.store import make_storage

    study = optuna.load_study(study_name=f"bench-jobs{jobs}", storage=make_storage(None, root))
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        end = t.datetime_complete.timestamp() if t.datetime_complete else None
        if end is not None and window_wall < end <= window_wall_end:
            state = t.user_attrs.get("autokd_state") or t.state.name
            states[state] = states.get(state, 0) + 1
    finished = sum(n for state, n in states.items() if state != "INTERRUPTED")
    span = window_end - window_start
    return {"trials_per_min": 60 * finished / span, "window_s": span, "finished_in_window": finished,
            "states": states, "startup_s": window_start - started, "util": util.window(window_start, window_end)}


def section_search(device: torch.device, sizes: Sizes, quick: bool, util: Utilisation, results: dict[str, Any],
                   out_dir: Path | None) -> None:
    root = Path(tempfile.mkdtemp(prefix="autokd-gpu-bench-"))
    log_path = (out_dir or root) / "gpu_bench_search.log"
    say(f"  studies under {root}; search output in {log_path}")
    section_started = time.perf_counter()
    # Warm-up: trains and caches the digits teacher and its outputs, shared by every arm.
    t0 = time.perf_counter()
    proc, run = _start(_search_cmd(root, device, "bench-warmup", 1, 1, quick, seed=0), log_path)
    try:
        proc.wait(timeout=sizes.search_cap_s / 2)
    except subprocess.TimeoutExpired:
        _stop(proc)
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in run.lines[-20:])
        say(f"  warm-up search failed (exit {proc.returncode}); skipping this section. Last output:\n{tail}")
        results["search"] = {"error": f"warm-up exit {proc.returncode}"}
        return
    say(f"  warm-up (teacher trained and cached, one trial): {time.perf_counter() - t0:.1f} s")
    arms = results.setdefault("search", {"arms": []})["arms"]
    flag = "--jobs-per-device" if device.type == "cuda" else "--jobs"
    for jobs in sizes.jobs:
        left = sizes.search_cap_s - (time.perf_counter() - section_started)
        if left < sizes.search_window_s + 20:
            say(f"  {flag} {jobs}: skipped, section time cap ({sizes.search_cap_s:.0f} s) reached")
            arms.append({"jobs": jobs, "skipped": "time cap"})
            continue
        row = {"jobs": jobs, **search_arm(root, device, sizes, jobs, quick, util, log_path)}
        arms.append(row)
        if "error" in row:
            say(f"  {flag} {jobs}: failed: {row['error']}")
            continue
        say(f"  {flag} {jobs}: {row['trials_per_min']:6.1f} trials/min ({row['finished_in_window']} trials in "
            f"{row['window_s']:.0f} s, {row['states']}; workers up after {row['startup_s']:.0f} s; "
            f"{fmt_util(row['util'])})")
    base = next((a["trials_per_min"] for a in arms if a.get("jobs") == 1 and "trials_per_min" in a), None)
    for a in arms:
        if base and "trials_per_min" in a and a["jobs"] != 1:
            say(f"  {flag} {a['jobs']} / 1: {a['trials_per_min'] / base:.2f}x the trials per minute")


# ----------------------------------------------------------------------------------------------------------

def print_summary(results: dict[str, Any]) -> None:
    """The figures again, as Markdown rows to paste into docs/performance.md ("GPU")."""
    say("SUMMARY (Markdown)")
    modes = [("fp32", "eager"), ("bf16", "eager"), ("bf16", "compiled"), ("bf16", "compiled reduce-overhead"),
             ("fp32", "compiled")]
    rows = results.get("throughput", [])
    if rows:
        print("| batch | " + " | ".join(f"{d} {m}" for d, m in modes) + " |", flush=True)
        print("|---" * (len(modes) + 1) + "|", flush=True)
        for batch in sorted({r["batch"] for r in rows}):
            cells = []
            for dtype, mode in modes:
                hit = next((r for r in rows if r["batch"] == batch and r["dtype"] == dtype and r["mode"] == mode), None)
                cells.append(f"{hit['images_per_s']:.0f} img/s" if hit and "images_per_s" in hit else "—")
            print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)
    peak = results.get("peak", {})
    fracs = [a for a in peak.get("arms", []) if a.get("fraction_of_bf16_peak") is not None]
    if fracs:
        best = max(fracs, key=lambda a: a["fraction_of_bf16_peak"])
        print(f"best fraction of the bf16 peak ({peak['peak_bf16_tflops']:.0f} TFLOP/s, {peak['peak_source']}): "
              f"{100 * best['fraction_of_bf16_peak']:.2f} % ({best['tflops']:.2f} TFLOP/s, batch {best['batch']} "
              f"{best['dtype']} {best['mode']}; {peak['macs_per_image'] / 1e6:.2f} M MACs/image)", flush=True)
    for arm in sorted(results.get("search", {}).get("arms", []), key=lambda a: a["jobs"]):
        if "trials_per_min" in arm:
            util = arm["util"]
            u = f", GPU util {util['util_mean']:.0f} %" if "util_mean" in util else ""
            print(f"jobs per device {arm['jobs']}: {arm['trials_per_min']:.1f} trials/min{u}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test; on the CPU)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, TFLOP/s (default: by name)")
    parser.add_argument("--sections", default="throughput,peak,search",
                        help="comma-separated subset of throughput, peak, search")
    parser.add_argument("--only", default="", help="throughput arms to run, e.g. 'bf16' or 'eager' (substring)")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="folder for gpu_bench.json and the search log (default $OUT when set)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device here; run with --device cpu --quick for a smoke test", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    sizes = QUICK_SIZES if args.quick or device.type == "cpu" else GPU_SIZES
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    sections = {s.strip() for s in args.sections.split(",")}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": name,
                               "torch": torch.__version__, "python": sys.version.split()[0], "quick": args.quick}
    util = Utilisation(device)
    results["utilisation"] = util.note
    say(f"autokd GPU benchmark on {name} ({device}); torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"GPU utilisation: {util.note}")

    def save() -> None:
        if args.out:
            (args.out / "gpu_bench.json").write_text(json.dumps(results, indent=2, default=str))

    try:
        if "throughput" in sections:
            say(f"1. images/s, typical student (resnet w0.5 d0.5), {sizes.n_train} synthetic 3x{sizes.input_size}"
                f"x{sizes.input_size} images, KD from cached teacher logits (cap {sizes.throughput_cap_s:.0f} s)")
            section_throughput(device, sizes, util, results,
                               lambda spec: args.only in " ".join(map(str, spec.values())))
            save()
        if "peak" in sections:
            say("2. achieved fraction of the peak bf16 FLOP/s")
            section_peak(device, sizes, results, args.peak_tflops)
            save()
        if "search" in sections:
            say(f"3. trials per minute, `autokd search` on digits (default space, --no-prune, random sampler), "
                f"window {sizes.search_window_s:.0f} s per arm (cap {sizes.search_cap_s:.0f} s)")
            section_search(device, sizes, args.quick, util, results, args.out)
            save()
    finally:
        util.stop()
        results["seconds"] = time.perf_counter() - STARTED
        save()
    print_summary(results)
    say(f"done in {time.perf_counter() - STARTED:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
