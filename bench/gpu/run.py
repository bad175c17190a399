"""The GPU check: one command that measures every GPU path of Foil on a bare machine in under 8 minutes.

    python3 bench/gpu/run.py --out DIR        # on a GPU machine (make gpu-check); tables and logs land in DIR
    python3 bench/gpu/run.py --tiny --out DIR # the CPU fallback at a tiny size (a test runs it in make test)

The machine needs Python with torch, numpy, pytest and the packages of a common CUDA image; what else Foil
imports (``bench/gpu/requirements.txt``: diffusers, and Django for the compute-only precompute, which imports
the model classes but no database) is installed from the wheels that ``make gpu-wheels`` downloads into
``var/gpu-wheels`` (carried with the tree), into a private folder: nothing of the machine's is changed. It
needs no database, broker or network. Steps, in order, each printing as it goes, with its own time budget
(a step that would overrun is skipped and the summary says so):

1. tests: the CUDA tests of the Django-free code (methods, nets, rendering), without Django's pytest plugin
   or the suite's conftest (which needs a database);
2. cells: ``bench/bench_cell_methods.py``, VGG-16 and ResNet-50 heads, 1 and 10 distractors, float32 and
   bfloat16, the plain reference loop on the same GPU;
3. generative: ``bench/bench_generative_speed.py``, every generative method at batch 1 and 16, on the embedded
   default's backbones (trained ones from ``--backbones`` when given, else random) and random models of the
   papers' sizes (256 px);
4. precompute: ``bench/bench_precompute.py --compute-only``: a small study's units explained and rendered
   without database or broker (Fashion-MNIST from ``var/gpu-wheels/fashion-mnist``).

``DIR/summary.md`` holds the versions, the device and each step's status and time; each step writes
``DIR/<step>.log`` and the benchmarks their tables (``cells.md``, ``generative.md``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = Path(__file__).with_name("requirements.txt")
WHEELS = ROOT / "var" / "gpu-wheels"
TOTAL_S = 480.0  # 8 minutes, the whole check
# The Django-free test modules that hold CUDA tests or exercise methods, nets and rendering.
TEST_FILES = [
    "tests/explain/test_cve.py",
    "tests/explain/test_semantic.py",
    "tests/explain/test_scout.py",
    "tests/explain/test_gen_methods.py",
    "tests/explain/test_gen_nets.py",
    "tests/explain/test_rendering.py",
    "tests/explain/test_small_cnn.py",
    "tests/explain/test_classifiers.py",
]


@dataclass
class Step:
    name: str
    budget_s: float  # the most this step may take
    min_s: float  # skipped when less than this is left
    command: list[str]
    needs: tuple[str, ...] = ()  # distributions the step imports beyond torch, numpy and pytest


def requirements() -> list[tuple[str, str]]:
    """(name, version) pinned in bench/gpu/requirements.txt."""
    pins = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins.append((name, version))
    return pins


def installed_version(name: str, site: Path) -> str | None:
    for path in [str(site), *sys.path]:
        for dist in importlib.metadata.distributions(path=[path]):
            if dist.metadata["Name"] and _normal(dist.metadata["Name"]) == _normal(name):
                return dist.version
    return None


def _normal(name: str) -> str:
    return name.lower().replace("-", "_")


def install_missing(wheels: Path, site: Path, log) -> dict[str, str]:
    """Install each pinned package that is not importable from ``wheels`` into ``site``; returns what is
    still missing (name -> why) after that."""
    missing = {}
    for name, version in requirements():
        have = installed_version(name, site)
        if have is not None:
            log(f"  {name} {have} present")
            continue
        found = sorted(wheels.glob(f"{_normal(name)}-{version}-*.whl")) + sorted(
            wheels.glob(f"{name}-{version}-*.whl")
        )
        if not found:
            missing[name] = f"no wheel {name}=={version} in {wheels} (run make gpu-wheels and carry it)"
            log(f"  {name}: MISSING, {missing[name]}")
            continue
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
            + ["--disable-pip-version-check", "--target", str(site), str(found[0])],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            missing[name] = f"pip install failed: {result.stderr.strip().splitlines()[-1:]}"
            log(f"  {name}: {missing[name]}")
        else:
            log(f"  {name} {version} installed from {found[0].name}")
    return missing


def versions(device: str) -> list[str]:
    import torch

    lines = [
        f"python {platform.python_version()} ({sys.executable}), {platform.machine()}, {os.cpu_count()} CPUs",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), numpy {importlib.metadata.version('numpy')}",
    ]
    for name in ("diffusers", "torchvision", "Django", "pytest"):
        try:
            lines[-1] += f", {name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            lines[-1] += f", {name} absent"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"device: {torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB, "
            f"{props.multi_processor_count} SMs, capability {props.major}.{props.minor}"
        )
    else:
        lines.append("device: CPU only (no CUDA device): the fallback, not a GPU measurement")
    return lines


def steps(out: Path, tiny: bool, device: str, backbones: Path | None, data: Path) -> list[Step]:
    python = [sys.executable]
    pytest = [*python, "-m", "pytest", "-p", "no:django", "-p", "no:cacheprovider", "--noconftest", "-q"]
    if tiny:
        return [
            Step("tests", 600, 0, [*pytest, "-m", "gpu", TEST_FILES[0]]),
            Step(
                "cells",
                600,
                0,
                [*python, "-m", "bench.bench_cell_methods", "--tiny", "--settings", "tiny", "--devices"]
                + ["cpu", "--markdown", str(out / "cells.md")],
            ),
            Step(
                "generative",
                600,
                0,
                [*python, "bench/bench_generative_speed.py", "--tiny", "--device", "cpu", "--sizes"]
                + ["embedded", "--batches", "1,2", "--markdown", str(out / "generative.md")],
                ("diffusers",),
            ),
            Step(
                "precompute",
                600,
                0,
                [*python, "bench/bench_precompute.py", "--compute-only", "--n-learning", "1"]
                + ["--train-steps", "10", "--devices", "cpu", "--data", str(data)],
                ("diffusers", "Django"),
            ),
        ]
    generative = [*python, "bench/bench_generative_speed.py", "--device", device]
    generative += ["--markdown", str(out / "generative.md")]
    if backbones is not None:
        generative += ["--backbones", str(backbones)]
    return [
        Step("tests", 90, 20, [*pytest, "-m", "gpu", *TEST_FILES]),
        Step(
            "cells",
            150,
            60,
            [*python, "-m", "bench.bench_cell_methods", "--settings", "gpu", "--devices", device]
            + ["--precisions", "float32,bfloat16", "--markdown", str(out / "cells.md")],
        ),
        Step("generative", 180, 60, generative, ("diffusers",)),
        Step(
            "precompute",
            50,
            20,
            [*python, "bench/bench_precompute.py", "--compute-only", "--n-learning", "10"]
            + ["--devices", device, "--data", str(data)],
            ("diffusers", "Django"),
        ),
    ]


def run_step(step: Step, timeout: float, env: dict, log_path: Path) -> tuple[str, float]:
    """Run one step, streaming its output to the console and ``log_path``; (status, seconds). The
    benchmarks get ``--budget-s`` a little under ``timeout`` and skip the rows they cannot finish; a step
    still running at ``timeout`` is killed."""
    command = list(step.command)
    if step.name in ("cells", "generative"):
        command += ["--budget-s", f"{max(timeout - 20, 1):.0f}"]
    start = time.perf_counter()
    with log_path.open("w") as log:
        log.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        for line in process.stdout:
            print(f"[{step.name}] {line}", end="", flush=True)
            log.write(line)
        process.wait()
        watchdog.cancel()
    seconds = time.perf_counter() - start
    if seconds >= timeout:
        return f"stopped at its budget ({timeout:.0f} s)", seconds
    return ("ok" if process.returncode == 0 else f"FAILED (exit {process.returncode})"), seconds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "var" / "gpu-check"))
    parser.add_argument(
        "--tiny", action="store_true", help="the CPU fallback at a tiny size (seconds per step)"
    )
    parser.add_argument("--wheels", type=Path, default=WHEELS)
    parser.add_argument("--backbones", type=Path, default=None, help="trained embedded-default backbones")
    parser.add_argument("--total-s", type=float, default=TOTAL_S)
    args = parser.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    summary: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        summary.append(line)

    log(f"# Foil GPU check{' (tiny CPU fallback)' if args.tiny else ''}")
    site = Path(os.environ.get("TMPDIR", "/tmp")) / "foil-gpu-site"
    site.mkdir(parents=True, exist_ok=True)
    log("packages:")
    missing = install_missing(args.wheels, site, log)
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(site), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if args.tiny:
        env["OMP_NUM_THREADS"] = "1"  # tiny tensors: one thread is faster, and the machine may be shared
    sys.path[:0] = [str(site)]

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    for line in versions(device):
        log(line)
    if device == "cpu" and not args.tiny:
        log("no CUDA device: running the tiny CPU fallback instead")
        args.tiny = True
    data = args.wheels / "fashion-mnist"
    if not data.is_dir():
        from_debian = Path("/usr/share/datasets/fashion-mnist")
        data = from_debian if from_debian.is_dir() else data

    total = float("inf") if args.tiny else args.total_s
    log("\n| step | status | seconds |\n|---|---|---:|")
    rows = []
    failed = False
    for step in steps(args.out, args.tiny, device, args.backbones, data):
        left = total - (time.perf_counter() - started)
        lacking = [name for name in step.needs if name in missing]
        if lacking:
            status, seconds = f"skipped: {', '.join(lacking)} missing ({missing[lacking[0]]})", 0.0
            failed = True
        elif left < step.min_s:
            status, seconds = f"skipped: needs at least {step.min_s:.0f} s, {max(left, 0):.0f} s left", 0.0
        else:
            print(f"\n== {step.name} (budget {min(step.budget_s, left):.0f} s)", flush=True)
            status, seconds = run_step(step, min(step.budget_s, left), env, args.out / f"{step.name}.log")
            failed |= status.startswith("FAILED")
        rows.append(f"| {step.name} | {status} | {seconds:.0f} |")
        print(f"== {step.name}: {status} ({seconds:.0f} s)", flush=True)
    summary += rows
    summary.append(f"\ntotal {time.perf_counter() - started:.0f} s")
    (args.out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(["", *summary[-len(rows) - 1 :]]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
