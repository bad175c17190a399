"""A person's way through a study in real Chromium: Prolific and MTurk raters, reload mid-phase, no
JavaScript, a phone-sized screen. Screenshots of every phase go to test-artifacts/browser/<test>/."""

import re

import pytest
from playwright.sync_api import expect

from explain.methods import method_names
from studies.models import Assignment, Condition, Response, Trial
from tests.studies.builders import live_study

pytestmark = pytest.mark.django_db(transaction=True)

PHASE_KEYS = {"pre": "d", "learning": "Enter", "test": "a"}


def _trial(page) -> tuple[str, str]:
    section = page.locator("section.trial")
    return section.get_attribute("data-phase"), section.get_attribute("data-trial")


def _wait_past(page, key: str) -> None:
    """Until the trial ``key`` has gone: the next one swapped in, or the page moved on (the debrief). A
    locator assertion, retried across the navigation after the last answer (a function waited for in the
    page can miss it)."""
    expect(page.locator(f'section.trial[data-trial="{key}"]')).to_have_count(0)


def _answer_by_key(page, phase: str, side: str) -> None:
    current = _trial(page)[1]  # read before the key press: the next trial may be swapped in at once
    # As a person would: press once the trial has settled (swapped in, its form wired, its timing started).
    expect(page.locator(f'section.trial[data-trial="{current}"][data-ready]')).to_have_count(1)
    if phase == "learning":
        button = page.locator('form.answer button[value="seen"]')
        expect(button).to_be_disabled()  # the minimum viewing time
        expect(button).to_be_enabled()
    page.keyboard.press(PHASE_KEYS[phase] if phase != "test" else side)
    _wait_past(page, current)


def _start(page, url: str) -> None:
    page.goto(url)
    expect(page.locator('[data-step="consent"]')).to_be_visible()
    page.shot("consent")
    page.check('input[name="consent"]')
    page.click("text=Start")
    expect(page.locator('[data-step="instructions"]')).to_be_visible()
    page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    page.shot("instructions")
    page.click("text=Begin")
    expect(page.locator("section.trial")).to_be_visible()


def _forbidden(study) -> re.Pattern:
    words = (
        [label.name for label in study.dataset.classes.all()] + method_names() + list(Condition.Setup.values)
    )
    return re.compile("|".join(rf"(?<![A-Za-z0-9]){re.escape(w)}(?![A-Za-z0-9])" for w in words), re.I)


def test_a_prolific_rater_takes_the_whole_study_reloads_mid_phase_and_returns_to_prolific(
    live_server, browser_page, recorder
):
    page = browser_page
    study = live_study(n_pairs=2, min_learning_seconds=1.0, prolific_completion_code="PROLIFIC9")
    received = []  # (url, headers, body) of everything the browser gets from the study's server

    def keep(route):
        response = route.fetch(max_redirects=0)
        received.append((route.request.url, str(response.headers), response.body()))
        route.fulfill(response=response)

    page.route(f"{live_server.url}/**", keep)
    _start(page, f"{live_server.url}/s/{study.pk}/?PROLIFIC_PID=p1&STUDY_ID=s1&SESSION_ID=x1")
    shot_phases, answered = set(), 0
    while page.locator("section.trial").count():
        phase, key = _trial(page)
        page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        if phase not in shot_phases:
            shot_phases.add(phase)
            page.shot(f"{phase}")
        if answered == 3:
            page.evaluate("window.foilMarker = 42")  # survives only if trials are swapped, not reloaded
        if answered == 2:  # reload in the middle of the warm-up: the same, first unanswered trial comes back
            page.reload()
            assert _trial(page) == (phase, key)
            assert Response.objects.count() == 2
        side = "a" if answered % 2 else "b"
        if page.locator("section.trial").count() and answered == 7:
            assert page.evaluate("window.foilMarker") == 42
        _answer_by_key(page, phase, side)
        answered += 1
    expect(page.locator('[data-step="done"]')).to_be_visible()
    page.shot("done")
    assignment = Assignment.objects.get(study=study)
    assert assignment.status == Assignment.Status.COMPLETED
    assert answered == Trial.objects.filter(block__assignment=assignment).count() == Response.objects.count()
    assert not Response.objects.filter(client_rt_ms__isnull=True).exists()  # measured in the browser
    assert not Response.objects.filter(server_rt_ms__isnull=True).exists()
    assert set(Response.objects.filter(phase="pre").values_list("answer", flat=True)) == {"D"}
    # Nothing the browser received names a class, a method or a setup.
    forbidden = _forbidden(study)
    assert len(received) > 40 and any("htmx" in url for url, _, _ in received)
    for url, headers, body in received:
        assert not forbidden.search(url + headers + body.decode("latin-1")), url
    page.click("text=Return to Prolific")
    expect(page.locator("h1")).to_have_text("recorded")
    back = [r for r in recorder.requests if r["path"] != "/favicon.ico"]
    assert [(r["path"], r["query"]) for r in back] == [("/submissions/complete", {"cc": ["PROLIFIC9"]})]


def test_an_mturk_worker_previews_accepts_and_submits_the_hit(live_server, browser_page, recorder):
    page = browser_page
    study = live_study(n_pairs=1, min_learning_seconds=0.5)
    entry = f"{live_server.url}/s/{study.pk}/?hitId=3HIT&turkSubmitTo={recorder.base}"
    page.goto(entry + "&assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE")
    expect(page.locator('[data-step="preview"]')).to_be_visible()
    expect(page.locator("button.primary")).to_be_disabled()
    expect(page.locator('input[name="consent"]')).to_be_disabled()
    page.shot("preview")
    assert Assignment.objects.count() == 0
    _start(page, entry + "&assignmentId=3ASSIGNMENT&workerId=AWORKER1")
    while page.locator("section.trial").count():
        phase, key = _trial(page)
        button = page.locator("form.answer button").first
        expect(button).to_be_enabled()
        button.click()  # with the mouse this time
        _wait_past(page, key)
    expect(page.locator('[data-step="done"]')).to_be_visible()
    page.shot("done")
    code = Assignment.objects.get().completion_code
    page.click("text=Submit the HIT")
    expect(page.locator("h1")).to_have_text("recorded")
    posted = [r for r in recorder.requests if r["path"] != "/favicon.ico"][-1]
    assert (posted["method"], posted["path"]) == ("POST", "/mturk/externalSubmit")
    assert posted["form"] == {"assignmentId": ["3ASSIGNMENT"], "completion_code": [code]}


@pytest.mark.parametrize("browser_page", [{"java_script_enabled": False}], indirect=True)
def test_the_study_works_without_javascript_as_full_pages(live_server, browser_page):
    page = browser_page
    study = live_study(n_pairs=1, n_images=2, n_learning=1)
    _start(page, f"{live_server.url}/s/{study.pk}/")
    while page.locator("section.trial").count():
        phase, key = _trial(page)
        page.locator("form.answer button").last.click()
        page.wait_for_load_state()
        _wait_past(page, key)
    expect(page.locator('[data-step="done"]')).to_be_visible()
    page.shot("done-without-js")
    assert Response.objects.count() == Trial.objects.count() == 2 + 1 + 2
    assert not Response.objects.filter(client_rt_ms__isnull=False).exists()  # no script, no browser timing
    assert not Response.objects.filter(server_rt_ms__isnull=True).exists()


@pytest.mark.parametrize("browser_page", [{"viewport": {"width": 390, "height": 844}}], indirect=True)
def test_trials_fit_a_phone_screen(live_server, browser_page):
    page = browser_page
    study = live_study(n_pairs=1, n_images=1, n_learning=1)
    _start(page, f"{live_server.url}/s/{study.pk}/")
    while page.locator("section.trial").count():
        phase, key = _trial(page)
        page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        page.shot(f"phone-{phase}")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        for box in [b.bounding_box() for b in page.locator("form.answer button").all()]:
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["height"] >= 40
        page.locator("form.answer button").first.click()
        _wait_past(page, key)
    expect(page.locator('[data-step="done"]')).to_be_visible()
