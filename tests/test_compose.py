"""docker-compose.yml describes a server: db, redis, a one-shot migrate, web (gunicorn) and a GPU worker on
`explain`, with health checks; the image holds runtime dependencies only and runs as a non-root user."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_volumes(compose):
    assert set(compose["services"]) == {"db", "redis", "migrate", "web", "worker"}
    assert compose["services"]["db"]["image"].startswith("postgres:")
    assert compose["services"]["redis"]["image"].startswith("redis:")
    db_volumes = compose["services"]["db"]["volumes"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in db_volumes), "the database needs a volume"
    for name in ("web", "worker"):
        volumes = compose["services"][name]["volumes"]
        assert "media:/media" in volumes, f"{name} must share the media volume"
    assert {"pgdata", "media"} <= set(compose["volumes"])


def test_migrations_run_once_before_web_and_worker_start(compose):
    assert compose["services"]["migrate"]["command"] == "python manage.py migrate --noinput"
    assert compose["services"]["migrate"]["restart"] == "no"
    web = compose["services"]["web"]["command"]
    assert "gunicorn config.wsgi:application" in web and "migrate" not in web  # replicas never race
    for name in ("web", "worker"):
        assert compose["services"][name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_web_and_worker_have_health_checks(compose):
    web = compose["services"]["web"]["healthcheck"]["test"]
    assert "http://127.0.0.1:8000/healthz/" in " ".join(web)
    worker = compose["services"]["worker"]["healthcheck"]["test"]
    assert "inspect ping" in " ".join(worker) and "celery@$$HOSTNAME" in " ".join(worker)


def test_health_endpoint_answers_when_the_database_does(client, db):
    response = client.get("/healthz/")
    assert response.status_code == 200 and response.content == b"ok"


def test_image_runs_as_a_non_root_user_with_runtime_dependencies_only():
    dockerfile = "\n".join(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.startswith("#")
    )
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    assert "requirements.txt" in dockerfile and "requirements-dev.txt" not in dockerfile
    runtime = {line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().split()}
    assert not runtime & {"pytest", "pytest-django", "ruff", "playwright", "factory_boy", "faker"}
    assert {"gunicorn", "whitenoise", "django"} <= runtime
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev and any(line.startswith("pytest==") for line in dev)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".venv/", "var/", "test-artifacts/", ".git/"} <= set(ignored)


def test_web_and_the_load_benchmark_serve_with_one_gunicorn_config_file(compose):
    from gunicorn.config import Config

    assert "--config config/gunicorn.conf.py" in compose["services"]["web"]["command"]
    bench = (ROOT / "bench" / "bench_rater_load.py").read_text()
    assert 'GUNICORN_CONFIG = "config/gunicorn.conf.py"' in bench
    settings: dict = {}
    exec((ROOT / "config" / "gunicorn.conf.py").read_text(), settings)
    config = Config()
    for name, value in settings.items():
        if not name.startswith("_") and name != "os":
            config.set(name, value)  # an unknown setting or a bad value raises
    assert config.worker_class_str == "gthread" and config.workers >= 1 and config.threads > 1
    assert config.keepalive > 1


def test_worker_is_a_solo_celery_worker_on_the_explain_queue_with_a_gpu(compose):
    worker = compose["services"]["worker"]
    command = worker["command"].split()
    assert command[:4] == ["celery", "-A", "config.celery_app", "worker"]
    assert "explain" in command[command.index("-Q") + 1].split(",")
    assert "--pool=solo" in command
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("service", ["web", "worker"])
def test_app_services_use_the_real_services(compose, service):
    env = compose["services"][service]["environment"]
    assert env["DATABASE_URL"].startswith("postgres://") and "@db:5432/" in env["DATABASE_URL"]
    assert env["CELERY_BROKER_URL"] == "redis://redis:6379/0"
    assert env["DJANGO_SETTINGS_MODULE"] == "config.settings.production"
    assert set(compose["services"][service]["depends_on"]) == {"db", "redis", "migrate"}


def docker_compose_config(**env: str) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: `make test` installs Debian's docker-compose (apt-get)"
    return subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "DJANGO_SECRET_KEY"} | env,
        timeout=60,
    )


def test_docker_compose_accepts_the_file():
    result = docker_compose_config(DJANGO_SECRET_KEY="a-long-random-secret")
    assert result.returncode == 0, result.stderr


def test_docker_compose_demands_a_secret_key():
    result = docker_compose_config()
    assert result.returncode != 0 and "DJANGO_SECRET_KEY" in result.stderr
