"""The statistics are a plain library: they import without Django settings and never import torch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


PURE = ["analysis.stats", "analysis.primary", "analysis.power", "analysis.simulate", "analysis.figures"]


@pytest.mark.parametrize("module", PURE)
def test_imports_without_django_or_torch(module):
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'django', 'torch'})\n"
        "assert not bad, f'imported: {bad[:5]}'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
