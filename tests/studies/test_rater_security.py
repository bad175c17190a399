"""Tampering: nothing reveals the answer or the condition, and a rater can only touch their own trials.

The tampering tests run twice: with cookies, and with every cookie dropped before each request (as inside
MTurk's cross-site frame), where only the token in the URLs carries the rater."""

import re
from types import SimpleNamespace

import pytest
from django.test import Client, override_settings
from django.urls import reverse

from explain.imaging import png_chunks, stripped_png
from explain.methods import method_names
from studies import services
from studies import views as views_module
from studies.models import Assignment, Block, Condition, Response, Trial
from tests.factories import RaterFactory
from tests.studies.builders import SECRET_CLASS_NAMES, data_guards_off, live_study, png
from tests.studies.walk import ClientRater, body

PROLIFIC = {"PROLIFIC_PID": "scan-me", "STUDY_ID": "s", "SESSION_ID": "x"}
UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
TOKEN = "[A-Za-z0-9_-]{32}"
ALLOWED_URL = (
    r"data:,|/static/studies/(htmx\.min\.js|rater\.js|rater\.css)"
    rf"|/s/r/{TOKEN}/(t/{UUID}/(img/[12]/)?|example/[12]/|instructions/|finish/|events/)?"
    r"|/s/STUDY/"
)


@pytest.fixture(params=[True, False], ids=["cookies", "no-cookies"])
def cookies(request) -> bool:
    return request.param


def _forbidden_words(study) -> list[str]:
    words = [label.name for label in study.dataset.classes.all()]
    words += [name.split()[0] for name in SECRET_CLASS_NAMES] + method_names()
    words += list(Condition.Setup.values) + [str(label) for label in Condition.Setup.labels]
    words += ["correct", "condition", "is_catch", "catch"]
    return words


def _scan(text: str, words: list[str]) -> list[str]:
    return [w for w in words if re.search(rf"(?<![A-Za-z0-9]){re.escape(w)}(?![A-Za-z0-9])", text, re.I)]


@pytest.mark.django_db
def test_no_response_a_rater_receives_names_a_class_a_method_a_setup_or_the_answers(cookies):
    study = live_study(n_pairs=2, catch_trials_per_pair=1, prolific_completion_code="DONE42")
    rater = ClientRater(cookies=cookies)
    rater.finish(reverse("studies:entry", args=[study.pk]), PROLIFIC)
    rater.received.append(rater.client.get(rater.url("finish")))
    words = _forbidden_words(study)
    assert len(rater.received) > 60
    for response in rater.received:
        headers = "\n".join(f"{k}: {v}" for k, v in response.items())
        cookies = "\n".join(f"{m.key}={m.value}" for m in response.cookies.values())
        data = body(response).decode("latin-1")
        assert _scan(headers + cookies + data, words) == [], response
        if response.get("Content-Type") == "image/png":
            kinds = {kind for kind, _ in png_chunks(body(response))}
            assert kinds <= {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"gAMA", b"sRGB", b"cHRM"}
            assert "Content-Disposition" not in response and "Last-Modified" not in response
        else:
            # Every URL on a page is a static asset, a page of the study, or an image by a trial's random key
            # (or the instructions' example): no image ids, file names or labels.
            for src in re.findall(r'(?:src|href|action)="([^"]+)"', data):
                assert re.fullmatch(ALLOWED_URL.replace("STUDY", str(study.pk)), src), src


def _page_html(rater: ClientRater) -> str:
    return rater.client.get(rater.url("go")).content.decode()


@pytest.mark.django_db
def test_a_trial_page_is_the_same_whatever_its_correct_answer_and_condition(cookies):
    study = live_study(n_pairs=1)
    rater = ClientRater(cookies=cookies)
    page = rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), **PROLIFIC))
    rater.post(page.form.action, dict(page.form.fields))
    trial = Trial.objects.get(key=rater.get(rater.url("go")).trial)
    before = _page_html(rater)
    with data_guards_off():
        Trial.objects.filter(pk=trial.pk).update(correct_answer="B" if trial.correct_answer == "A" else "A")
        block = trial.block
        other = Condition.objects.filter(study=study).exclude(pk=block.condition_id).first()
        block.condition = other
        block.save(update_fields=["condition"])
    assert _page_html(rater) == before


def _normalized(html: str, rater: ClientRater) -> str:
    """A page with what must differ from trial to trial replaced: the trial keys (in the image URLs, the form
    and the preload links) and the progress counts."""
    html = html.replace(rater.token, "TOKEN")
    html = re.sub(UUID, "KEY", html)
    # The last trial of a phase preloads the next phase's images (two for learning): position, not answer.
    html = re.sub(r'<link rel="preload" as="image" href="[^"]+">', "", html)
    return re.sub(r"\b\d+ of \d+\b", "N of N", html)


@pytest.mark.django_db
def test_whole_pages_of_trials_with_different_answers_and_conditions_are_identical_but_for_the_images(
    cookies,
):
    """Every trial of every phase, as a full page and as the htmx partial that swapped it in, compared with
    every other trial of its phase: answers and conditions differ among them, the pages must not."""
    study = live_study(n_pairs=2, design="within", catch_trials_per_pair=1)
    rater = ClientRater(cookies=cookies)
    page = rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), **PROLIFIC))
    page = rater.post(page.form.action, dict(page.form.fields))
    with data_guards_off():  # button sides are drawn per block; hold them still to compare blocks
        Block.objects.update(a_on_left=True)
    pages: dict[str, set[str]] = {}
    truths: dict[str, set[tuple]] = {}
    partial = None
    while page.step == "trial":
        trial = Trial.objects.select_related("block").get(key=page.trial)
        full = _normalized(rater.client.get(rater.url("go")).content.decode(), rater)
        pages.setdefault(trial.phase, set()).add(full)
        if partial is not None:
            pages.setdefault(f"{trial.phase} htmx", set()).add(_normalized(partial, rater))
        truths.setdefault(trial.phase, set()).add(
            (trial.correct_answer, trial.block.condition_id, trial.is_catch)
        )
        answer = page.form.buttons[0][1]
        response = rater.client.post(page.form.action, {"answer": answer}, headers={"HX-Request": "true"})
        partial = response.content.decode() if "HX-Redirect" not in response else None
        page = rater._page(response) if partial else rater.get(response["HX-Redirect"])
    assert page.step == "done"
    for phase, seen in pages.items():
        assert len(seen) == 1, f"{phase} pages differ:\n" + "\n----\n".join(sorted(seen))
    for phase in ("pre", "test"):
        assert {answer for answer, _, _ in truths[phase]} == {"A", "B"}
        assert len({condition for _, condition, _ in truths[phase]}) == 2
    assert {catch for _, _, catch in truths["test"]} == {True, False}
    assert len({condition for _, condition, _ in truths["learning"]}) == 2
    assert {"pre htmx", "learning htmx", "test htmx"} <= set(pages)


@pytest.mark.django_db
def test_button_sides_are_drawn_apart_from_the_condition_and_the_pair():
    """The whole-page comparison above holds the button sides still across blocks; here the sides must not
    follow the condition or the pair either: over 24 raters with fixed seeds, every condition x pair cell has
    raters with class A's button on each side."""
    study = live_study(n_pairs=2, design="within")
    for seed in range(24):
        services.assignment_create(study=study, rater=RaterFactory(), provider="direct", seed=seed)
    sides = {}
    for condition, pair, a_on_left in Block.objects.values_list("condition", "pair", "a_on_left"):
        sides.setdefault((condition, pair), set()).add(a_on_left)
    assert len(sides) == 4 and all(seen == {True, False} for seen in sides.values()), sides


@pytest.mark.django_db
def test_image_metadata_is_stripped_and_other_formats_are_re_encoded():
    data = png((1, 2, 3), text={"Title": "Sooty Albatross"}).read()
    assert b"Sooty" in data
    clean = stripped_png(data)
    assert b"Sooty" not in clean and [k for k, _ in png_chunks(clean)][0] == b"IHDR"
    import io

    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.new("RGB", (4, 4), (9, 9, 9)).save(out, format="JPEG", comment=b"Least Auklet")
    clean = stripped_png(out.getvalue())
    assert b"Auklet" not in clean
    assert PILImage.open(io.BytesIO(clean)).size == (4, 4)
    with pytest.raises(ValueError, match="not a PNG"):
        png_chunks(b"GIF89a")


@pytest.mark.django_db
def test_a_rater_gets_404_for_another_raters_trials_and_images(cookies):
    study = live_study()
    entry = reverse("studies:entry", args=[study.pk])
    owner = ClientRater(cookies=cookies)
    intruder = ClientRater(cookies=cookies)
    page = owner.consent(owner.get(entry, **PROLIFIC))
    page = owner.post(page.form.action, dict(page.form.fields))
    intruder.consent(intruder.get(entry, PROLIFIC_PID="intruder", STUDY_ID="s", SESSION_ID="y"))
    answer, image = page.form.action, page.images[0]
    assert owner.token in answer and owner.token in image
    # The intruder's own token with the owner's trial key, and made-up tokens: nothing.
    for token in (intruder.token, "A" * 32):
        assert intruder.client.post(answer.replace(owner.token, token), {"answer": "A"}).status_code == 404
        assert intruder.client.get(image.replace(owner.token, token)).status_code == 404
    near = owner.token[:-1] + ("A" if owner.token[-1] != "A" else "B")
    for token in ("A" * 32, near):
        for name in ("go", "finish", "example/1"):
            url = owner.url(name.split("/")[0], **({"slot": 1} if "/" in name else {}))
            assert intruder.client.get(url.replace(owner.token, token)).status_code == 404, name
        for name in ("instructions", "events"):
            assert intruder.client.post(owner.url(name).replace(owner.token, token)).status_code == 404
    assert owner.client.get(image).status_code == 200
    assert owner.client.get(image.replace("/img/1/", "/img/2/")).status_code == 404
    assert Response.objects.count() == 0


@pytest.mark.django_db
def test_posts_sent_from_another_site_or_without_the_signed_consent_form_are_refused(cookies):
    """No cookie-based CSRF token can work in MTurk's frame; a POST is authorised by the token in its URL (or
    the signed consent form) and refused when the browser says another site sent it."""
    study = live_study()
    entry = reverse("studies:entry", args=[study.pk])
    evil = {"HTTP_ORIGIN": "https://evil.example"}
    assert Client().post(entry, {**PROLIFIC, "consent": "yes"}).status_code == 403  # no signed form
    forged = {**PROLIFIC, "consent": "yes", "form": "eyJzdHVkeSI6MX0:forged:signature"}
    assert Client().post(entry, forged).status_code == 403
    rater = ClientRater(cookies=cookies)
    form = rater.get(entry, **PROLIFIC).form
    other = live_study()  # a form signed for another study is no good here
    other_form = ClientRater().get(reverse("studies:entry", args=[other.pk]), **PROLIFIC).form
    assert (
        Client().post(entry, {**PROLIFIC, "consent": "yes", "form": other_form.fields["form"]}).status_code
        == 403
    )
    assert rater.client.post(entry, {**form.fields, "consent": "yes"}, **evil).status_code == 403
    assert (
        Client().post(entry, {**form.fields, "consent": "yes"}, HTTP_SEC_FETCH_SITE="cross-site").status_code
        == 403
    )
    assert Assignment.objects.count() == 0
    page = rater.consent(rater.get(entry, **PROLIFIC))
    assert page.step == "instructions"
    instructions = page.form.action
    page = rater.post(instructions, dict(page.form.fields))
    assert page.step == "trial"
    for url, data in ((page.form.action, {"answer": "A"}), (rater.url("events"), {"kind": "blur"})):
        assert rater.client.post(url, data, **evil).status_code == 403, url
        assert rater.client.post(url, data, HTTP_SEC_FETCH_SITE="cross-site").status_code == 403, url
    assert Response.objects.count() == 0 and not Assignment.objects.get().events.exists()
    same = {"HTTP_ORIGIN": "http://testserver", "HTTP_SEC_FETCH_SITE": "same-origin"}
    assert rater.client.post(page.form.action, {"answer": "A"}, **same).status_code == 302
    assert Response.objects.count() == 1


@pytest.mark.django_db
def test_behind_a_proxy_that_ends_tls_the_sites_https_origin_counts_once_it_is_trusted(settings):
    """The README's deployment step: the server sees itself as http:// behind a TLS proxy, so the browser's
    https:// Origin is another origin until DJANGO_CSRF_TRUSTED_ORIGINS names it."""
    study = live_study()
    rater = ClientRater()
    page = rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), **PROLIFIC))
    page = rater.post(page.form.action, dict(page.form.fields))
    https = {"HTTP_ORIGIN": "https://testserver", "HTTP_SEC_FETCH_SITE": "same-origin"}
    assert rater.client.post(page.form.action, {"answer": "A"}, **https).status_code == 403
    settings.CSRF_TRUSTED_ORIGINS = ["https://testserver"]
    assert rater.client.post(page.form.action, {"answer": "A"}, **https).status_code == 302
    assert Response.objects.count() == 1


@pytest.mark.django_db
def test_only_mturk_worker_sites_may_frame_rater_pages_and_every_other_page_is_denied():
    study = live_study()
    rater = ClientRater()
    entry = reverse("studies:entry", args=[study.pk])
    responses = [rater.client.get(entry, PROLIFIC)]
    page = rater.consent(rater.get(entry, **PROLIFIC))
    responses.append(rater.client.get(rater.url("go")))
    responses.append(rater.client.get(entry, {"assignmentId": "ASSIGNMENT_ID_NOT_AVAILABLE", "hitId": "3H"}))
    responses.append(rater.client.post(page.form.action))
    missing = rater.client.get(reverse("studies:go", kwargs={"token": "A" * 32}))  # said inside the frame too
    assert missing.status_code == 404 and "not part of the study" in missing.content.decode()
    responses.append(missing)
    policy = "frame-ancestors https://worker.mturk.com https://www.mturk.com https://workersandbox.mturk.com"
    for response in responses:
        assert response["Content-Security-Policy"] == policy and "X-Frame-Options" not in response
    for url in ("/admin/login/", "/admin/", "/api/"):
        response = Client().get(url)
        assert response["X-Frame-Options"] == "DENY" and "Content-Security-Policy" not in response, url


@pytest.mark.django_db
def test_a_rater_cannot_reach_the_admin():
    study = live_study()
    rater = ClientRater()
    rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), **PROLIFIC))
    for url in ("/admin/", "/admin/studies/response/", "/admin/studies/trial/"):
        response = rater.client.get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"], url


@pytest.mark.django_db
def test_bad_answers_are_refused_with_the_reason(cookies):
    study = live_study()
    rater = ClientRater(cookies=cookies)
    page = rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), **PROLIFIC))
    page = rater.post(page.form.action, dict(page.form.fields))
    for bad in ("X", "seen", ""):
        response = rater.client.post(page.form.action, {**page.form.fields, "answer": bad})
        assert response.status_code == 400 and repr(bad) in response.content.decode()
    assert Response.objects.count() == 0


def answers_in_a_row(rater, study, count: int, after_each=lambda: None):
    """Consent, the instructions (the 1st counted POST), then ``count`` answer POSTs one after the other;
    their status codes and the last page reached."""
    page = rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), **PROLIFIC))
    page = rater.post(page.form.action, dict(page.form.fields))
    statuses = []
    for _ in range(count):
        response = rater.client.post(page.form.action, {**page.form.fields, "answer": "D"})
        statuses.append(response.status_code)
        if response.status_code == 302:
            page = rater.get(response["Location"])
        after_each()
    return statuses, page


@pytest.mark.django_db
@override_settings(FOIL_RATER_POSTS_PER_MINUTE=5)
def test_submissions_are_rate_limited_per_rater(cookies):
    study = live_study(n_images=6)
    rater = ClientRater(cookies=cookies)
    statuses, _ = answers_in_a_row(rater, study, 6)
    assert statuses[:4] == [302] * 4 and statuses[4:] == [429, 429]
    assert Response.objects.count() == 4
    other = ClientRater()  # another rater is not affected
    page = other.consent(other.get(reverse("studies:entry", args=[study.pk]), PROLIFIC_PID="other"))
    assert page.step == "instructions"


@pytest.mark.django_db
@override_settings(FOIL_RATER_POSTS_PER_MINUTE=5)
def test_the_rate_limit_holds_across_the_turn_of_a_minute(monkeypatch):
    """Four answers in the last seconds of a minute and more in the first of the next: the sixth POST within
    a few seconds is refused, as within one minute (a fixed per-minute count would start again at 0); a
    minute later the rater may answer again."""
    clock = [60 * 1_000_000 + 57.0]  # three seconds before a minute turns
    monkeypatch.setattr(views_module, "time", SimpleNamespace(time=lambda: clock[0]))
    study = live_study(n_images=8)
    rater = ClientRater()

    def tick():
        clock[0] += 1.0  # 57, 58, 59 | 60 (the turn), 61, 62

    statuses, page = answers_in_a_row(rater, study, 6, after_each=tick)
    assert statuses == [302, 302, 302, 302, 429, 429]
    assert Response.objects.count() == 4
    clock[0] += 60
    response = rater.client.post(page.form.action, {**page.form.fields, "answer": "D"})
    assert response.status_code == 302 and Response.objects.count() == 5
