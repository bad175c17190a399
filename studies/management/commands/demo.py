"""`make demo`: the database, a researcher account, the site and a worker, the demo study,
simulated raters and the report, then where to go."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from ctypes import CDLL
from ctypes.util import find_library
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from studies.demo import BUDGETS, demo_prepare, step

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Run in the child before exec: the kernel sends it SIGTERM when the demo process dies, even by SIGKILL,
    so no worker or web server outlives the demo that started it (Linux; elsewhere the demo's own cleanup)."""
    if sys.platform.startswith("linux"):
        CDLL(find_library("c") or "libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def database_ensure() -> bool:
    """Create the PostgreSQL database named in DATABASE_URL when it does not exist. Returns whether it did."""
    import psycopg
    from psycopg import sql

    url = urlparse(settings.DATABASE_URL)
    name = url.path.lstrip("/")
    maintenance = url._replace(path="/postgres").geturl()
    with psycopg.connect(maintenance, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True


def researcher_ensure() -> tuple[str, str]:
    """The researcher account (staff, superuser) from the FOIL_RESEARCHER_* settings, password reset."""
    User = get_user_model()
    user, _ = User.objects.get_or_create(
        username=settings.FOIL_RESEARCHER_USERNAME, defaults={"email": settings.FOIL_RESEARCHER_EMAIL}
    )
    user.is_staff = user.is_superuser = True
    user.set_password(settings.FOIL_RESEARCHER_PASSWORD)
    user.save()
    return settings.FOIL_RESEARCHER_USERNAME, settings.FOIL_RESEARCHER_PASSWORD


class Command(BaseCommand):
    help = (
        "The main job: set up the database and a researcher account, start the web server and a Celery "
        "worker, build the demo study on the embedded Fashion-MNIST (import, train, mine pairs, precompute "
        "every method x setup through the worker, launch), optionally send simulated raters and write the "
        "report, then print where to go."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default=os.environ.get("FOIL_HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("FOIL_PORT", "8000")))
        parser.add_argument(
            "--budget",
            choices=sorted(BUDGETS),
            default=os.environ.get("FOIL_DEMO_BUDGET", "full"),
            help="How much work the demo study takes: full (the demo) or tiny (the test of the same path).",
        )
        parser.add_argument(
            "--simulate", type=int, default=0, metavar="N", help="Send N simulated raters; write the report."
        )
        parser.add_argument(
            "--site-only", action="store_true", help="Start the site and a worker without the demo study."
        )
        parser.add_argument(
            "--no-serve", action="store_true", help="Stop after printing where to go instead of serving."
        )

    def handle(self, *args, host: str, port: int, budget: str, simulate: int, **options) -> None:
        # Ctrl-C (SIGINT) stops the demo even if it started with SIGINT ignored, as a background job
        # of a script does (a child inherits it): Python then installs no KeyboardInterrupt handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        say = self._say
        if simulate < 0:
            raise CommandError(f"--simulate takes a number of raters >= 0, not {simulate}")
        say(f"Database: {settings.DATABASE_SOURCE}")
        namespace = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("global_keyprefix")
        say(f"Broker:   {settings.BROKER_SOURCE}" + (f", keys under {namespace}" if namespace else ""))
        if not settings.DATABASE_IS_POSTGRES or not settings.CELERY_BROKER_URL.startswith("redis://"):
            say("          (embedded defaults for a first look; start PostgreSQL and Redis for real studies)")
        if settings.DATABASE_IS_POSTGRES and database_ensure():
            say(f"Created database {urlparse(settings.DATABASE_URL).path.lstrip('/')!r}")
        call_command("migrate", interactive=False, verbosity=0)
        say("Migrations applied")
        key = (
            "from DJANGO_SECRET_KEY"
            if settings.SECRET_KEY_FROM_ENVIRONMENT
            else f"in {settings.SECRET_KEY_FILE}"
        )
        say(f"Debug:    {'ON (DJANGO_DEBUG=1)' if settings.DEBUG else 'off'}; secret key {key}")
        username, password = researcher_ensure()

        env = {**os.environ, "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "")}
        env["DJANGO_SETTINGS_MODULE"] = env["DJANGO_SETTINGS_MODULE"] or "config.settings.local"
        python = sys.executable
        worker_name = f"demo-{os.getpid()}@{socket.gethostname()}"
        worker = subprocess.Popen(
            [python, "-m", "celery", "-A", "config.celery_app", "worker", "-Q", "explain,default",
             "--pool=solo", "--loglevel=warning", "-n", worker_name],
            env=env,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        call_command("collectstatic", interactive=False, verbosity=0)
        # Served as on a server: gunicorn, DEBUG off (unless DJANGO_DEBUG=1), static files through WhiteNoise.
        web = subprocess.Popen(
            [python, "-m", "gunicorn", "config.wsgi:application", "--bind", f"{host}:{port}",
             "--config", str(settings.BASE_DIR / "config" / "gunicorn.conf.py"), "--workers", "2",
             "--access-logfile", "/dev/null"],
            env=env,
            cwd=settings.BASE_DIR,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        children = [web, worker]
        started = time.monotonic()
        try:
            base = f"http://{host}:{port}"
            self._wait_for(f"{base}/admin/login/", web)
            self._wait_for_worker(worker_name, worker)
            study, report_paths = None, None
            if not options["site_only"]:
                say(f"Building the demo study ({budget} budget); each step is reused by the next run.")
                study = demo_prepare(budget=BUDGETS[budget], say=say)
                if simulate:
                    with step(say, f"{simulate} simulated raters over HTTP"):
                        call_command("simulate_raters", str(study.pk), n=simulate, base_url=base)
                    with step(say, "the report (HTML, PDF, CSV tables)"):
                        report_paths = self._report(study)
            say("")
            say(self.style.SUCCESS(f"Foil is running (ready after {time.monotonic() - started:.0f} s)."))
            say(f"  Researcher admin: {base}/admin/")
            say(f"  Login:            {username} / {password}")
            say("                    (FOIL_RESEARCHER_USERNAME / FOIL_RESEARCHER_PASSWORD choose others)")
            if study is not None:
                say(f"  Study:            {study.title!r} (id {study.pk}), {study.status}")
                say(f"  Precompute:       {base}/research/studies/{study.pk}/precompute/")
                say(f"  Stimuli gallery:  {base}/research/studies/{study.pk}/gallery/")
                say(f"  Rater link:       {base}/s/{study.pk}/")
                say(f"  Report:           {base}/analysis/studies/{study.pk}/report/")
                if report_paths:
                    say(f"  Report files:     {report_paths['html']} and {report_paths['pdf']}")
                else:
                    say("                    (after raters have answered; `make demo SIMULATE=40` sends 40)")
            say(f"  Celery worker:    pid {worker.pid}, queues explain and default")
            if options["no_serve"]:
                return
            say("Press Ctrl-C to stop.", ending="\n")
            self.stdout.flush()
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
            dead = next(child for child in children if child.poll() is not None)
            name = "web server" if dead is web else "Celery worker"
            raise CommandError(f"the {name} stopped with exit code {dead.returncode}; see its output above")
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        except KeyboardInterrupt:
            say("Stopping.")
        finally:
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20  # one grace period for all (gunicorn's own is 30 s, per child)
            for child in children:
                try:
                    child.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait(timeout=10)

    def _say(self, message: str, ending: str = "\n") -> None:
        self.stdout.write(message, ending=ending)
        self.stdout.flush()

    def _report(self, study) -> dict[str, Path]:
        out = Path(settings.FOIL_REPORT_ROOT) / f"study-{study.pk}"
        call_command("report", str(study.pk), out=out)
        return {"html": out / "report.html", "pdf": out / "report.pdf"}

    def _wait_for(self, url: str, process: subprocess.Popen, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise CommandError(
                    f"the web server exited with code {process.returncode} before answering {url}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise CommandError(f"the web server did not answer {url} within {timeout:.0f} s")

    def _wait_for_worker(self, name: str, process: subprocess.Popen, timeout: float = 90) -> None:
        from config.celery_app import app

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise CommandError(
                    f"the Celery worker exited with code {process.returncode} before it was ready"
                )
            if app.control.ping(destination=[name], timeout=1):
                return
        raise CommandError(f"the Celery worker {name} did not answer within {timeout:.0f} s")
