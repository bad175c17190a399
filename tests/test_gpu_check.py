"""The GPU check (bench/gpu/run.py) runs end to end at its tiny CPU size: it cannot rot between GPU loans."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_step_on_the_cpu_fallback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "bench/gpu/run.py", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = (tmp_path / "summary.md").read_text()
    for step in ("tests", "cells", "generative", "precompute"):
        assert f"| {step} | ok |" in summary, summary
    assert "torch " in summary and "device: CPU only" in summary
    cells = (tmp_path / "cells.md").read_text()
    assert "| VGG-16 | semantic | 10 |" in cells and "| ResNet-50 | cve | 1 |" in cells
    generative = (tmp_path / "generative.md").read_text()
    for method in ("c3lt", "slc", "ldce-cls", "rcsb-28px"):  # 16-pixel RCSB cells do not tile 28 px
        assert f"| embedded | random weights | {method} |" in generative
    assert "compute only, CPU" in (tmp_path / "precompute.log").read_text()
    assert (
        "passed" in (tmp_path / "tests.log").read_text() or "skipped" in (tmp_path / "tests.log").read_text()
    )
