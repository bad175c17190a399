"""The demo and local settings serve like a server: DEBUG off unless asked for, a secret key generated once
into var/ (never the repository's), static files through WhiteNoise."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def settings_of(module: str, tmp_path: Path, **env: str) -> dict:
    code = (
        "import json, django; from django.conf import settings; django.setup(); "
        "print(json.dumps({'debug': settings.DEBUG, 'key': settings.SECRET_KEY, "
        "'middleware': settings.MIDDLEWARE, 'static': settings.STORAGES['staticfiles']['BACKEND']}))"
    )
    clean = {k: v for k, v in os.environ.items() if k not in {"DJANGO_SECRET_KEY", "DJANGO_DEBUG"}}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean | {"DJANGO_SETTINGS_MODULE": module, "DJANGO_SECRET_KEY_FILE": str(tmp_path / "key")} | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


def test_local_settings_generate_a_secret_key_once_and_keep_debug_off(tmp_path):
    first = settings_of("config.settings.local", tmp_path)
    assert first["debug"] is False and len(first["key"]) >= 50
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    assert settings_of("config.settings.local", tmp_path)["key"] == first["key"]  # kept, not regenerated
    assert "whitenoise.middleware.WhiteNoiseMiddleware" in first["middleware"]
    assert first["static"].startswith("whitenoise.")


def test_debug_only_when_asked_for(tmp_path):
    assert settings_of("config.settings.local", tmp_path, DJANGO_DEBUG="1")["debug"] is True


def test_production_demands_a_secret_key_from_the_environment(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "DJANGO_SECRET_KEY"}
        | {
            "DJANGO_SETTINGS_MODULE": "config.settings.production",
            "DJANGO_SECRET_KEY_FILE": str(tmp_path / "k"),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "DJANGO_SECRET_KEY is not set" in result.stderr


def test_a_worker_lets_idle_openmp_threads_sleep_unless_told_otherwise():
    """OMP_WAIT_POLICY is read once, when torch's OpenMP loads: the Celery app sets it (PASSIVE) before
    anything imports torch, and keeps a value the environment gives."""
    code = (
        "import os, sys; import config.celery_app; "
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for env, expected in (({}, "PASSIVE False"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE False")):
        run = [sys.executable, "-c", code]
        result = subprocess.run(run, cwd=ROOT, env=clean | env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == expected
