"""The numerical code imports and runs with no Django settings: it can be used as a plain library.

Every module of the Django-free subpackages is listed from the tree, so a new module is checked without
editing this file.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DJANGO_FREE_PACKAGES = (
    "explain/methods",
    "explain/nets",
    "explain/data",
    "explain/stimuli",
    "explain/shipped",
)


def django_free_modules() -> list[str]:
    modules = []
    for package in DJANGO_FREE_PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


DJANGO_FREE = django_free_modules()


def test_every_subpackage_is_listed():
    assert {
        "explain.methods.cve",
        "explain.nets.split",
        "explain.data.idx",
        "explain.stimuli.rendering",
    } <= set(DJANGO_FREE)


@pytest.mark.parametrize("module", DJANGO_FREE)
def test_imports_without_django(module):
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        "loaded = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.'))\n"
        "assert not loaded, f'imported Django modules: {loaded[:5]}'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_method_registry_reads_declarations_without_torch():
    """The web process lists, validates and plans methods from the declarations alone: no torch."""
    code = (
        "import sys\n"
        "from explain.methods import method_names, registered\n"
        "assert 'ldce-cls-cpu-demo' in method_names() and registered('scout').declaration.kind == 'cell'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_web_process_does_not_import_torch_at_startup():
    """Settings, URLs, models and admin load without torch: the web process never imports it at startup."""
    code = (
        "import django, sys\n"
        "django.setup()\n"
        "import config.urls\n"
        "from django.contrib import admin\n"
        "admin.autodiscover()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
