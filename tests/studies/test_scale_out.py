"""Scale-out: two web processes behind the same database answer one rater consistently.

Two real gunicorn servers (config/gunicorn.conf.py, as in production) on two ports share the test database and
media. A rater whose requests alternate between them, as behind a load balancer without sticky sessions,
resumes where they are on either, and a repeated answer sent to both is stored once.
"""

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests
from django.conf import settings
from django.db import connection
from django.urls import reverse

from studies.http_rater import Page, parse_page
from studies.models import Assignment, Response, Trial
from tests.studies.builders import live_study

ROOT = Path(__file__).resolve().parents[2]
PROLIFIC = {"PROLIFIC_PID": "two-servers", "STUDY_ID": "s", "SESSION_ID": "x"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"gunicorn for {url} exited with {server.returncode}")
        try:
            requests.get(url, timeout=10)
            return
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.2)
    raise RuntimeError(f"gunicorn did not answer on {url} within {timeout} s")


@pytest.fixture
def two_servers(transactional_db) -> Iterator[list[str]]:
    """Base URLs of two gunicorn servers on the test database (one worker, two threads each)."""
    db = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "FOIL_TEST_MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "DJANGO_LOG_LEVEL": "WARNING",
    }
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    servers, urls = [], []
    try:
        for _ in range(2):
            port = _free_port()
            command = [gunicorn, "config.wsgi:application", "-c", "config/gunicorn.conf.py"]
            command += ["--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "2"]
            servers.append(subprocess.Popen(command, cwd=ROOT, env=env))
            urls.append(f"http://127.0.0.1:{port}")
        for url, server in zip(urls, servers, strict=True):
            _wait_for(url + "/s/0/", server)
        yield urls
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)


class AlternatingRater:
    """One browser (one cookie jar) whose every request goes to the next of the servers in turn."""

    def __init__(self, urls: list[str]) -> None:
        self.urls, self.turn, self.session = urls, 0, requests.Session()

    def base(self) -> str:
        self.turn += 1
        return self.urls[self.turn % len(self.urls)]

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.session.request(method, urljoin(self.base(), path), timeout=30, **kwargs)

    def page(self, method: str, path: str, **kwargs) -> Page:
        response = self.request(method, path, allow_redirects=False, **kwargs)
        while response.is_redirect:  # each redirect is followed on the other server
            response = self.request("GET", response.headers["Location"], allow_redirects=False)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])
        return parse_page(response.text, url=response.url)


def _post_at_once(urls: list[str], path: str, data: dict, cookies) -> list[int]:
    """The same form POSTed to every server at the same moment, each on a connection of its own."""
    barrier, statuses = threading.Barrier(len(urls)), []

    def send(url: str) -> None:
        browser = requests.Session()
        browser.cookies.update(cookies)
        barrier.wait()
        response = browser.post(urljoin(url, path), data=data, allow_redirects=False, timeout=30)
        statuses.append(response.status_code)

    threads = [threading.Thread(target=send, args=(url,)) for url in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def test_a_rater_alternating_between_two_servers_resumes_and_answers_once(two_servers):
    study = live_study(n_pairs=1, n_images=3, n_learning=2)
    entry = f"/s/{study.pk}/"
    rater = AlternatingRater(two_servers)
    page = rater.page("GET", entry, params=PROLIFIC)
    assert page.step == "consent"
    page = rater.page("POST", page.form.action, data={**page.form.fields, **page.form.checkboxes})
    assert page.step == "instructions"
    page = rater.page("POST", page.form.action, data=page.form.fields)
    go = reverse("studies:go", kwargs={"token": Assignment.objects.get().token})
    sent: dict[str, str] = {}
    while page.step == "trial":
        for src in page.images:  # images from either server: the same stored bytes
            first, second = rater.request("GET", src), rater.request("GET", src)
            assert first.status_code == second.status_code == 200 and first.content == second.content
        # Resume: the other server, and a new browser arriving through the study link, show the same trial.
        assert rater.page("GET", go).trial == page.trial
        fresh = AlternatingRater(two_servers[::-1]).page("GET", entry, params=PROLIFIC)
        assert fresh.trial == page.trial
        answer = [value for name, value in page.form.buttons if name == "answer"][-1]
        data = {**page.form.fields, "answer": answer, "client_rt_ms": "900"}
        # The same answer sent to both servers at once (a double click through a load balancer).
        statuses = _post_at_once(two_servers, page.form.action, data, rater.session.cookies)
        assert statuses == [302, 302]
        sent[page.trial] = answer
        previous_action = page.form.action
        page = rater.page("GET", go)
        # A late retry of the previous answer on either server changes nothing.
        for url in two_servers:
            retry = rater.session.post(
                urljoin(url, previous_action), data=data, allow_redirects=False, timeout=30
            )
            assert retry.status_code == 302
    assert page.step == "done" and page.code
    assert rater.page("GET", go).code == page.code
    stored = dict(Response.objects.values_list("trial__key", "answer"))
    assert {str(k): v for k, v in stored.items()} == sent
    assert len(sent) == Trial.objects.count() == Response.objects.count()
    assert Assignment.objects.get().status == Assignment.Status.COMPLETED
