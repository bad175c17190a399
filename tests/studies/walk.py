"""A rater walking the real pages with Django's test client, keeping every response it received."""

import re
from collections.abc import Callable

from django.test import Client
from django.urls import reverse

from studies.http_rater import Page, parse_page


def body(response) -> bytes:
    """A test response's bytes; a streamed file (an image) is read once and kept on the response."""
    if not response.streaming:
        return response.content
    if not hasattr(response, "read_body"):
        response.read_body = b"".join(response.streaming_content)
    return response.read_body


class ClientRater:
    """Consent -> instructions -> every trial -> debrief, through the views; ``received`` keeps every response
    (pages, redirects, images) for the leak scan. With ``cookies=False`` it drops every cookie before each
    request, as a browser does inside MTurk's cross-site frame: only the token in the URLs carries the
    rater."""

    def __init__(self, client: Client | None = None, *, cookies: bool = True) -> None:
        self.client = client or Client()
        self.cookies = cookies
        self.received = []
        self.token = ""  # the assignment's URL token, once a page or redirect has shown it

    def _keep(self, response):
        self.received.append(response)
        found = re.search(r"/s/r/([A-Za-z0-9_-]+)/", response.get("Location", ""))
        if found:
            self.token = found.group(1)
        return response

    def _forget_cookies(self) -> None:
        if not self.cookies:
            self.client.cookies.clear()

    def url(self, name: str, **kwargs) -> str:
        """A URL of this rater's assignment: ``url("go")``, ``url("answer", key=...)``."""
        return reverse(f"studies:{name}", kwargs={"token": self.token, **kwargs})

    def get(self, url: str, **params) -> Page:
        self._forget_cookies()
        response = self._keep(self.client.get(url, params))
        while response.status_code in (301, 302, 303):
            self._forget_cookies()
            response = self._keep(self.client.get(response["Location"]))
        return self._page(response)

    def post(self, url: str, data: dict, **headers) -> Page:
        self._forget_cookies()
        response = self._keep(self.client.post(url, data, headers=headers))
        while response.status_code in (301, 302, 303):
            self._forget_cookies()
            response = self._keep(self.client.get(response["Location"]))
        return self._page(response)

    def _page(self, response) -> Page:
        html = response.content.decode() if response.get("Content-Type", "").startswith("text/html") else ""
        return parse_page(html, status=response.status_code)

    def consent(self, page: Page) -> Page:
        return self.post(page.form.action, {**page.form.fields, "consent": "yes"})

    def answer(self, page: Page, answer: str, rt_ms: int = 900) -> Page:
        return self.post(page.form.action, {**page.form.fields, "answer": answer, "client_rt_ms": str(rt_ms)})

    def images(self, page: Page) -> list[bytes]:
        out = []
        for src in page.images:
            self._forget_cookies()
            response = self._keep(self.client.get(src))
            assert response.status_code == 200, (src, response.status_code)
            out.append(body(response))
        return out

    def finish(
        self, entry: str, query: dict | None = None, choose: Callable[[Page], str] | None = None
    ) -> tuple[Page, list[Page]]:
        """Walk from the study link to the debrief; returns the debrief and every trial page seen."""
        page = self.get(entry, **(query or {}))
        assert page.step == "consent", page.text
        page = self.consent(page)
        assert page.step == "instructions", page.text
        self.images(page)
        page = self.post(page.form.action, dict(page.form.fields))
        trials = []
        while page.step == "trial":
            trials.append(page)
            self.images(page)
            values = [v for n, v in page.form.buttons if n == "answer"]
            page = self.answer(page, choose(page) if choose else values[0])
        assert page.step == "done", page.text
        return page, trials
