"""The crowd platforms in real Chromium: an MTurk HIT framed by another site with third-party cookies
blocked (preview, consent, example, reload, a returned and re-accepted HIT, the POST to turkSubmitTo), and
every answer stored as the rater chose it, by button and by key."""

import random
from collections import Counter
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from studies.models import Assignment, Response, Trial
from tests.studies.builders import data_guards_off, live_study

pytestmark = pytest.mark.django_db(transaction=True)

IMAGES_LOADED = "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)"
BLOCKED = [{"third_party_cookies": "block", "viewport": {"width": 1280, "height": 800}}]
ALLOWED = [{"third_party_cookies": "allow"}]


def _trial_key(frame) -> str:
    section = frame.locator("section.trial")
    return section.get_attribute("data-trial") if section.count() else ""


def _wait_past(frame, key: str) -> None:
    """Until the trial ``key`` has gone: the next one swapped in, or the page moved on (the debrief). A
    locator assertion, retried across the navigation after the last answer (a function waited for in the
    page can miss it)."""
    expect(frame.locator(f'section.trial[data-trial="{key}"]')).to_have_count(0)


def _cookie_sent_into_a_frame(page, recorder, mturk_site) -> str | None:
    """Give the browser a cookie for the recorder's site (127.0.0.1, SameSite=None, so only third-party
    cookie blocking can keep it from a cross-site frame), check it is sent when the recorder is opened
    directly, then frame the recorder from the worker site (127.0.0.2) and return the Cookie header that
    request carried."""
    page.context.add_cookies(
        [
            {
                "name": "probe",
                "value": "1",
                "domain": "127.0.0.1",
                "path": "/",
                "sameSite": "None",
                "secure": True,
            }
        ]
    )
    page.goto(f"{recorder.base}/opened-directly")
    assert recorder.requests[-1]["cookie"] == "probe=1"
    page.goto(mturk_site.hit(f"{recorder.base}/framed"))
    expect(page.frame(name="hit").locator("h1")).to_have_text("recorded")
    framed = [r for r in recorder.requests if r["path"] == "/framed"]
    assert len(framed) == 1
    return framed[0]["cookie"]


@pytest.mark.parametrize("browser_page", ALLOWED, indirect=True)
def test_the_probe_cookie_reaches_a_cross_site_frame_when_third_party_cookies_are_allowed(
    recorder, mturk_site, browser_page
):
    """The control of the framed HIT test: where the profile allows third-party cookies the probe cookie does
    reach the frame (nothing else in the set-up keeps it out), so its absence there proves the blocking took
    effect."""
    assert _cookie_sent_into_a_frame(browser_page, recorder, mturk_site) == "probe=1"


@pytest.mark.parametrize("browser_page", BLOCKED, indirect=True)
def test_an_mturk_hit_framed_by_another_site_runs_to_the_end_without_cookies_and_posts_the_current_assignment(
    live_server, browser_page, recorder, mturk_site, settings
):
    page = browser_page
    # Third-party cookies are blocked in this profile: the probe cookie does not reach a frame on the worker
    # site (the test above shows it does where they are allowed).
    assert _cookie_sent_into_a_frame(page, recorder, mturk_site) is None
    study = live_study(
        n_pairs=2,
        pairs_per_assignment=1,
        n_images=2,
        n_learning=1,
        min_learning_seconds=0.3,
        completion_code="HIT7",
        pay="USD 1.20",
        expected_minutes=5,
        contact="lab@uni.example",
        ethics_reference="IRB-2026-117",
    )

    hit = f"{live_server.url}/s/{study.pk}/?hitId=3HIT&assignmentId="
    accepted = f"&workerId=AWORKER9&turkSubmitTo={recorder.base}"
    # Framing by a site that is not MTurk's is refused by the browser (frame-ancestors): the study's page
    # arrives, and the browser shows an error page in the frame instead.
    with page.expect_response(lambda r: r.url.startswith(hit)) as arrived:
        page.goto(mturk_site.hit(hit + "ASSIGNMENT_ID_NOT_AVAILABLE"))
    policy = arrived.value.headers["content-security-policy"]
    assert arrived.value.status == 200 and policy.startswith("frame-ancestors ")
    assert mturk_site.origin not in policy
    frame = page.locator("#hit").element_handle().content_frame()  # the error page may drop the frame's name
    frame.wait_for_load_state()
    assert frame.url.startswith("chrome-error://") and frame.locator("[data-step]").count() == 0
    settings.FOIL_RATER_FRAME_ANCESTORS = [mturk_site.origin]

    # The preview: no turkSubmitTo, no workerId; consent summary and the example, inputs disabled.
    page.goto(mturk_site.hit(hit + "ASSIGNMENT_ID_NOT_AVAILABLE"))
    frame = page.frame(name="hit")
    expect(frame.locator('[data-step="preview"]')).to_be_visible()
    frame.wait_for_function(IMAGES_LOADED)
    assert frame.locator("img").count() == 2
    for shown in ("USD 1.20", "about 5 minutes", "lab@uni.example", "IRB-2026-117"):
        expect(frame.locator("dl.details")).to_contain_text(shown)
    expect(frame.locator("button.primary")).to_be_disabled()
    page.shot("framed-preview")
    frame.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # the HIT scrolls inside its frame
    page.shot("framed-preview-end")
    assert Assignment.objects.count() == 0

    # Accepted: consent, the instructions' example, the first answers.
    page.goto(mturk_site.hit(hit + "3FIRST" + accepted))
    frame = page.frame(name="hit")
    expect(frame.locator('[data-step="consent"]')).to_contain_text("IRB-2026-117")
    page.shot("framed-consent")
    frame.check('input[name="consent"]')
    frame.click("text=Start")
    expect(frame.locator('[data-step="instructions"]')).to_contain_text("another pair of kinds")
    frame.wait_for_function(IMAGES_LOADED)
    page.shot("framed-instructions")
    assignment = Assignment.objects.get()
    own_pairs = set(assignment.blocks.values_list("pair_id", flat=True))
    assert assignment.example_explanation.pair_id not in own_pairs
    frame.click("text=Begin")
    expect(frame.locator("section.trial")).to_be_visible()
    frame.wait_for_function(IMAGES_LOADED)
    page.shot("framed-trial")
    answered = 0
    for _ in range(2):
        key = _trial_key(frame)
        frame.locator("form.answer button").first.click()
        _wait_past(frame, key)
        answered += 1
    # The back button inside the frame (htmx swaps add no history: back is the page before the trials): the
    # study shows where the worker is, and nothing is answered twice.
    key = _trial_key(frame)
    with frame.expect_navigation():
        page.evaluate("history.back()")
    frame = page.frame(name="hit")
    expect(frame.locator("section.trial")).to_be_visible()
    assert _trial_key(frame) == key and Response.objects.count() == answered
    # MTurk reloads the whole page: the frame comes back to the same trial (no cookie: the worker id resumes).
    page.reload()
    frame = page.frame(name="hit")
    expect(frame.locator("section.trial")).to_be_visible()
    assert _trial_key(frame) == key and Response.objects.count() == answered

    # The worker returns the HIT and accepts it again: a new assignmentId, the same place.
    page.goto(mturk_site.hit(hit + "3SECOND" + accepted))
    frame = page.frame(name="hit")
    expect(frame.locator("section.trial")).to_be_visible()
    assert _trial_key(frame) == key
    while frame.locator("section.trial").count():
        key = _trial_key(frame)
        button = frame.locator("form.answer button").first
        expect(button).to_be_enabled()
        button.click()
        _wait_past(frame, key)
    expect(frame.locator('[data-step="done"]')).to_be_visible()
    page.shot("framed-done")
    assignment.refresh_from_db()
    code = frame.locator("strong.code").inner_text()
    assert assignment.status == Assignment.Status.COMPLETED and code == assignment.completion_code
    assert code.startswith("HIT7-") and len(code) == 15
    last_stored = max(Response.objects.values_list("received_at", flat=True))
    assert Response.objects.count() == Trial.objects.filter(block__assignment=assignment).count()

    frame.click("text=Submit the HIT")
    expect(frame.locator("h1")).to_have_text("recorded")
    posted = [r for r in recorder.requests if r["method"] == "POST"]
    assert len(posted) == 1 and posted[0]["path"] == "/mturk/externalSubmit"
    assert posted[0]["form"] == {"assignmentId": ["3SECOND"], "completion_code": [code]}
    assert posted[0]["at"] > last_stored
    # The block took effect: the cookie sent to the recorder directly did not come from inside the frame, and
    # the study's own cookie, set by its responses in the frame, was never stored.
    assert posted[0]["cookie"] is None
    assert [c["name"] for c in page.context.cookies(live_server.url)] == []


def test_every_answer_is_stored_as_chosen_by_button_label_and_by_key(live_server, browser_page):
    """A rater picks answers at random and gives each one by key or by clicking the button with that label;
    the stored answers must be the chosen ones (a swapped key map, or button values swapped under their
    labels, fail)."""
    page = browser_page
    study = live_study(n_pairs=2, n_images=4, n_learning=1, catch_trials_per_pair=1, min_learning_seconds=0.2)
    labels = {"A": study.label_a, "B": study.label_b, "D": "Don't know"}
    keys = {"A": "a", "B": "b", "D": "d", "seen": "Enter"}
    rng = random.Random(7)
    page.goto(f"{live_server.url}/s/{study.pk}/")
    page.check('input[name="consent"]')
    page.click("text=Start")
    page.click("text=Begin")
    expect(page.locator("section.trial")).to_be_visible()
    chosen: dict[str, str] = {}
    ways = set()
    uses, per_phase = Counter(), Counter()
    orders = {"pre": rng.sample(["A", "B", "D"], 3), "learning": ["seen"], "test": rng.sample(["A", "B"], 2)}
    while page.locator("section.trial").count():
        phase, key = page.locator("section.trial").get_attribute("data-phase"), _trial_key(page)
        answer = orders[phase][per_phase[phase] % len(orders[phase])]  # every answer often, in a random order
        per_phase[phase] += 1
        way = "key" if uses[answer] % 2 == 0 else "button"  # each answer given both ways, in turn
        uses[answer] += 1
        if answer == "seen":
            button = page.locator('form.answer button[value="seen"]')
        else:
            button = page.locator("form.answer button", has_text=labels[answer])
        expect(button).to_be_enabled()
        expect(page.locator(f'section.trial[data-trial="{key}"][data-ready]')).to_have_count(1)  # settled
        if way == "key":
            page.keyboard.press(keys[answer])
        else:
            button.click()
        _wait_past(page, key)
        chosen[key] = answer
        ways.add((phase, answer, way))
    expect(page.locator('[data-step="done"]')).to_be_visible()
    stored = {str(k): a for k, a in Response.objects.values_list("trial__key", "answer")}
    assert stored == chosen
    assert {(answer, way) for _, answer, way in ways} >= {
        ("A", "key"),
        ("A", "button"),
        ("B", "key"),
        ("B", "button"),
        ("D", "key"),
        ("D", "button"),
    }


def _returned(recorder) -> dict:
    """The query of the last return to Prolific's completion URL."""
    return [r for r in recorder.requests if r["path"] == "/submissions/complete"][-1]["query"]


def test_prolific_raters_go_back_with_the_code_of_their_outcome_failed_checks_and_timed_out(
    live_server, browser_page, recorder
):
    """Prolific's other outcomes in the browser: a rater who fails the declared attention checks is shown and
    sent back with the failed-check code; one who ran out of time, on their next page, with the timeout
    code."""
    page = browser_page
    study = live_study(
        n_pairs=1,
        n_images=2,
        n_learning=1,
        catch_trials_per_pair=2,
        exclusion_rules={"failed_catch_trials": 1},
        prolific_completion_code="OK-CODE",
        prolific_failed_check_code="CHECK-CODE",
        prolific_timeout_code="TIME-CODE",
    )
    entry = f"{live_server.url}/s/{study.pk}/?STUDY_ID=s1&SESSION_ID=x1&PROLIFIC_PID="
    page.goto(entry + "careless")
    page.check('input[name="consent"]')
    page.click("text=Start")
    page.click("text=Begin")
    expect(page.locator("section.trial")).to_be_visible()
    missed = 0
    while page.locator("section.trial").count():
        key = _trial_key(page)
        trial = Trial.objects.get(key=key)
        if trial.phase == "learning":
            value = "seen"
        elif trial.is_catch:  # the attention check, answered wrongly
            value, missed = ("B" if trial.correct_answer == "A" else "A"), missed + 1
        else:
            value = trial.correct_answer
        button = page.locator(f'form.answer button[value="{value}"]')
        expect(button).to_be_enabled()
        button.click()
        _wait_past(page, key)
    assert missed == Trial.objects.filter(is_catch=True).count() >= 1
    expect(page.locator("strong.code")).to_have_text("CHECK-CODE")
    page.click("text=Return to Prolific")
    expect(page.locator("h1")).to_have_text("recorded")
    assert _returned(recorder) == {"cc": ["CHECK-CODE"]}

    page.goto(entry + "slow")
    page.check('input[name="consent"]')
    page.click("text=Start")
    expect(page.locator('[data-step="instructions"]')).to_be_visible()
    with data_guards_off():  # backdate the start: the rater ran out of time
        Assignment.objects.filter(rater__identities__external_id="slow").update(
            started_at=timezone.now() - timedelta(minutes=study.time_limit_minutes + 1)
        )
    page.click("text=Begin")
    expect(page.locator('[data-step="ended"]')).to_be_visible()
    expect(page.locator("strong.code")).to_have_text("TIME-CODE")
    page.shot("prolific-timed-out")
    page.click("text=Return to Prolific")
    expect(page.locator("h1")).to_have_text("recorded")
    assert _returned(recorder) == {"cc": ["TIME-CODE"]}
