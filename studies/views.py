"""What raters see: consent, instructions, one trial at a time, the debrief and completion code.

Full pages for a plain browser (every form works without JavaScript); with htmx an answer swaps the trial for
the next one. After consent a rater's place is carried by their assignment's unguessable token in every URL
(``/s/r/<token>/...``), so the study works where no cookie reaches it: MTurk shows it in a cross-site iframe,
where browsers block third-party cookies. A signed cookie only brings a direct-link rater back from the study
link. Images reach a rater through URLs made of their token and a trial's random key. Nothing sent says which
class an image belongs to, what the right answer is, or which condition the rater is in.

Django's CSRF check needs a cookie, so rater views do without it: a POST is authorised by the secret token in
its URL (or, for consent, a signed form field) and refused when the browser says another site sent it.
"""

import secrets
import time
from collections.abc import Callable
from functools import wraps
from uuid import UUID

from django.conf import settings
from django.core import signing
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.files.storage import default_storage
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import recruitment, services
from .models import Assignment, Phase, ProviderIdentity, Study, Trial
from .recruitment import Arrival
from .selectors import (
    Step,
    assignment_by_token,
    assignment_prolific_code,
    assignment_step,
    rater_prior_assignment,
    rater_took_excluded_study,
    rater_trial,
    study_closed_reason,
    study_preview_example,
    trial_image_name,
)

COOKIE = "foil_rater"
COOKIE_SALT = "foil.rater"
COOKIE_MAX_AGE = 30 * 24 * 3600
CONSENT_SALT = "foil.consent"
CONSENT_MAX_AGE = 24 * 3600
PHASE_NAMES = {Phase.PRE_LEARNING: "Warm-up", Phase.LEARNING: "Learning", Phase.TEST: "Test"}
# The heading above a refusal's message (services.RaterRefused.reason); the message itself thanks the person.
REFUSED_HEADINGS = {
    "closed": "This study is closed",
    "excluded": "You cannot take part in this study",
    "no_id": "This link is not complete",
    "sandbox": "This study has left the sandbox",
}


# --- who is asking, and from where ---


def rater_page(view: Callable) -> Callable:
    """A rater view: framed only by MTurk's worker sites (CSP frame-ancestors instead of X-Frame-Options:
    DENY), and POSTs checked without cookies: refused when the browser says another site sent them."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if request.method == "POST" and not _same_origin(request):
            response = _message(
                request,
                "This form came from another site",
                "Open the study from its own link, then answer on its pages.",
                status=403,
            )
        else:
            try:
                response = view(request, *args, **kwargs)
            except Http404:  # said inside MTurk's frame too (Django's own 404 page may not be framed)
                response = _message(
                    request,
                    "This page is not part of the study",
                    "Please open the study again from its link (on Mechanical Turk, from the HIT).",
                    status=404,
                )
        response["Content-Security-Policy"] = recruitment.frame_ancestors_policy()
        response.xframe_options_exempt = True
        return response

    return csrf_exempt(wrapped)


def _same_origin(request: HttpRequest) -> bool:
    """Whether a POST was sent by a page of this site, as the browser reports it (Origin, else Sec-Fetch-Site;
    a client that sends neither is no browser another site could drive)."""
    origin = request.META.get("HTTP_ORIGIN")
    if origin is not None:
        own = f"{'https' if request.is_secure() else 'http'}://{request.get_host()}"
        return origin in {own, *settings.CSRF_TRUSTED_ORIGINS}
    return request.META.get("HTTP_SEC_FETCH_SITE", "same-origin") in {"same-origin", "none"}


def rater_opaque_id(request: HttpRequest) -> UUID | None:
    """The opaque id of the rater this browser is bound to (signed cookie), or None."""
    value = request.get_signed_cookie(COOKIE, default=None, salt=COOKIE_SALT, max_age=COOKIE_MAX_AGE)
    try:
        return UUID(value) if value else None
    except ValueError:
        return None


def _bind(response: HttpResponse, assignment: Assignment) -> HttpResponse:
    """Bind the browser to the rater with a signed cookie (httponly; not readable by page scripts)."""
    response.set_signed_cookie(
        COOKIE,
        str(assignment.rater.opaque_id),
        salt=COOKIE_SALT,
        max_age=COOKIE_MAX_AGE,
        httponly=True,
        secure=settings.SESSION_COOKIE_SECURE,
        samesite="Lax",
    )
    return response


def _go(assignment: Assignment) -> HttpResponse:
    return redirect("studies:go", token=assignment.token)


def _cookie_assignment(request: HttpRequest, study_id: int) -> Assignment | None:
    """The assignment in this study of the rater this browser's cookie names (direct links)."""
    opaque_id = rater_opaque_id(request)
    if opaque_id is None:
        return None
    return Assignment.objects.filter(study_id=study_id, rater__opaque_id=opaque_id).first()


def _assignment(token: str) -> Assignment:
    """The assignment whose URL token this is (with its study and rater); 404 otherwise."""
    assignment = assignment_by_token(token=token)
    if assignment is None:
        raise Http404("No such assignment.")
    return assignment


def _rater_trial(token: str, key: UUID) -> Trial:
    """The trial with this key if it belongs to the assignment of this token; 404 otherwise."""
    trial = rater_trial(token=token, key=key)
    if trial is None:
        raise Http404("No such trial.")
    return trial


def _over_limit(request: HttpRequest, who: str, factor: int = 1) -> bool:
    """Whether ``who`` sent more POSTs in the last minute than ``factor`` x ``FOIL_RATER_POSTS_PER_MINUTE``.

    A sliding window over two minute buckets: this minute's count plus last minute's, weighted by the part of
    last minute still inside the window. A fixed minute would let twice the limit through across a minute's
    turn (the limit's count starting again at 0)."""
    now = time.time()
    minute, into = divmod(now, 60)
    key = f"foil:rater-posts:{who}:{int(minute)}"
    limit = settings.FOIL_RATER_POSTS_PER_MINUTE * factor
    if cache.add(key, 1, timeout=130):  # kept through the next minute, where it is the previous bucket
        current = 1
    else:
        try:
            current = cache.incr(key)
        except ValueError:  # expired between add and incr
            current = 1
    previous = cache.get(f"foil:rater-posts:{who}:{int(minute) - 1}", 0)
    return current + previous * (1 - into / 60) > limit


def _too_many(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "studies/message.html",
        {"heading": "Please slow down", "message": "Too many answers in a short time; wait a minute."},
        status=429,
    )


def _message(request: HttpRequest, heading: str, message: str, status: int = 200) -> HttpResponse:
    return render(request, "studies/message.html", {"heading": heading, "message": message}, status=status)


# --- arriving: direct link, Prolific, MTurk ---


def _consent_page(request: HttpRequest, study: Study, arrival: Arrival, notice: str = "", status: int = 200):
    document = recruitment.consent_document(study)
    form_token = signing.dumps({"study": study.pk, "consent": document.digest}, salt=CONSENT_SALT)
    context = {
        "study": study,
        "consent": document,
        "hidden": arrival.hidden_fields(),
        "form_token": form_token,
        "notice": notice,
    }
    return render(request, "studies/consent.html", context, status=status)


def _preview_page(request: HttpRequest, study: Study, arrival: Arrival) -> HttpResponse:
    """MTurk's preview of the HIT: what the study is, the consent summary and an example; a closed or full
    study says so here, before anyone accepts the HIT."""
    closed = study_closed_reason(
        study=study, provider=arrival.provider, cutoff=services.assignment_cutoff(study=study), preview=True
    )
    context = {
        "study": study,
        "consent": recruitment.consent_document(study),
        "example": study.status == Study.Status.LIVE and study_preview_example(study=study) is not None,
        "closed": closed,
    }
    return render(request, "studies/preview.html", context)


@rater_page
@require_http_methods(["GET", "POST"])
def study_entry(request: HttpRequest, study_id: int) -> HttpResponse:
    """The study link. GET shows consent (or resumes a returning rater); POST of the consent form starts."""
    study = get_object_or_404(Study, pk=study_id)
    arrival = recruitment.arrival_from(request.POST if request.method == "POST" else request.GET)
    if arrival.preview:
        return _preview_page(request, study, arrival)
    if arrival.is_mturk and not recruitment.mturk_submit_ok(arrival.extra["turkSubmitTo"]):
        return _message(
            request,
            "This link is not valid",
            "The HIT's return address is not Mechanical Turk's; open the study from the HIT on MTurk.",
            status=400,
        )
    if request.method == "GET":
        return _arrive(request, study, arrival)
    # New arrivals are limited per address, more loosely: many people can share one (a lab, a campus).
    if _over_limit(request, f"ip:{request.META.get('REMOTE_ADDR', '')}", factor=10):
        return _too_many(request)
    try:
        signed = signing.loads(request.POST.get("form", ""), salt=CONSENT_SALT, max_age=CONSENT_MAX_AGE)
    except signing.BadSignature:
        return _message(
            request, "This form has expired", "Please open the study link again to start.", status=403
        )
    if signed.get("study") != study.pk:
        return _message(request, "This form is not this study's", "Open the study from its own link.", 403)
    if request.POST.get("consent") != "yes":
        return _consent_page(request, study, arrival, "Please tick the box to agree.", status=400)
    document = recruitment.consent_document(study)
    if signed.get("consent") != document.digest:
        notice = "The consent text has changed since you opened this page; please read it again."
        return _consent_page(request, study, arrival, notice, status=409)
    external_id = arrival.external_id
    if arrival.is_direct:
        external_id = _direct_token(request)
    consent = services.consent_text_store(study=study, document=document)
    try:
        assignment = services.assignment_for(
            study=study,
            provider=arrival.provider,
            external_id=external_id,
            extra=arrival.extra,
            consent=consent,  # a new assignment is created consented
        )
    except services.RaterRefused as refused:
        heading = REFUSED_HEADINGS.get(refused.reason, "You cannot start this study")
        return _message(request, heading, refused.message, status=403)
    except ValidationError as error:
        return _message(request, "This study cannot start", " ".join(error.messages), status=503)
    if assignment.status == Assignment.Status.STARTED and assignment.consented_at is None:
        services.assignment_consent(assignment=assignment, consent=consent)
    return _bind(_go(assignment), assignment)


def _arrive(request: HttpRequest, study: Study, arrival: Arrival) -> HttpResponse:
    """A GET of the study link: a returning rater resumes; a new one sees consent, or why they cannot
    start."""
    prior = None
    if arrival.is_direct:
        prior = _cookie_assignment(request, study.pk)
    elif arrival.external_id:
        prior = rater_prior_assignment(
            provider=arrival.provider, external_id=arrival.external_id, study=study
        )
        if prior is not None and arrival.is_mturk:
            services.identity_extra_update(
                rater=prior.rater, provider=arrival.provider, study=study, extra=arrival.extra
            )
        if prior is None:
            identity = ProviderIdentity.objects.filter(
                provider=arrival.provider, external_id=arrival.external_id
            ).first()
            if identity and rater_took_excluded_study(rater_id=identity.rater_id, study=study):
                return _message(
                    request,
                    "Thank you for your interest",
                    "You took part in an earlier, related study, so you cannot take part in this one.",
                    status=403,
                )
    if prior is not None:
        return _bind(_go(prior), prior)
    closed = study_closed_reason(
        study=study, provider=arrival.provider, cutoff=services.assignment_cutoff(study=study)
    )
    if closed is not None:
        return _message(request, "This study is closed", closed)
    return _consent_page(request, study, arrival)


def _direct_token(request: HttpRequest) -> str:
    """The direct-link identity of this browser: its rater's, when the cookie names one; else a new token."""
    opaque_id = rater_opaque_id(request)
    if opaque_id is not None:
        identity = ProviderIdentity.objects.filter(
            rater__opaque_id=opaque_id, provider=ProviderIdentity.Provider.DIRECT
        ).first()
        if identity is not None:
            return identity.external_id
    return secrets.token_urlsafe(24)


# --- the run of an assignment ---


def _image_url(token: str, trial: Trial, slot: int) -> str:
    return reverse("studies:image", kwargs={"token": token, "key": trial.key, "slot": slot})


def _trial_context(step: Step, study: Study, token: str) -> dict:
    trial, block = step.trial, step.trial.block
    sides = [("A", study.label_a, "a"), ("B", study.label_b, "b")]
    if not block.a_on_left:
        sides.reverse()
    if trial.phase == Phase.LEARNING:
        stimuli = [
            {"url": _image_url(token, trial, 1 if side == "A" else 2), "label": label}
            for side, label, _ in sides
        ]
        buttons = [("seen", "Next", "Enter")]
    else:
        stimuli = [{"url": _image_url(token, trial, 1), "label": ""}]
        buttons = [(value, label, key.upper()) for value, label, key in sides]
        if trial.phase == Phase.PRE_LEARNING:
            buttons.append(("D", "Don't know", "D"))
    preload = []
    if step.next_trial is not None:
        slots = (1, 2) if step.next_trial.phase == Phase.LEARNING else (1,)
        preload = [_image_url(token, step.next_trial, s) for s in slots]
    return {
        "step": step,
        "trial": trial,
        "phase_name": PHASE_NAMES[Phase(trial.phase)],
        "stimuli": stimuli,
        "buttons": buttons,
        "answer_url": reverse("studies:answer", kwargs={"token": token, "key": trial.key}),
        "min_ms": round(study.min_learning_seconds * 1000) if trial.phase == Phase.LEARNING else 0,
        "preload": preload,
        "label_a": study.label_a,
        "label_b": study.label_b,
    }


def _render_step(request: HttpRequest, assignment: Assignment, notice: str = "", status: int = 200):
    """The page (or, for htmx, the stage partial) of the rater's current step."""
    step = assignment_step(assignment=assignment)
    go = reverse("studies:go", kwargs={"token": assignment.token})
    if step.kind != "trial" and request.htmx:
        response = HttpResponse("")
        response["HX-Redirect"] = go
        return response
    context = {"study": assignment.study, "assignment": assignment, "notice": notice}
    if step.kind == "trial":
        services.trial_shown(trial=step.trial)
        context |= _trial_context(step, assignment.study, assignment.token)
        template = "studies/_trial.html" if request.htmx else "studies/trial.html"
        return render(request, template, context, status=status)
    if step.kind == "consent":
        return redirect("studies:entry", study_id=assignment.study_id)
    if step.kind == "instructions":
        return render(request, "studies/instructions.html", context, status=status)
    context |= _done_context(assignment)
    if step.kind == "done":
        return render(request, "studies/done.html", context, status=status)
    return render(request, "studies/ended.html", context, status=status)


def _done_context(assignment: Assignment) -> dict:
    """The debrief, the rater's code and how it goes back to their platform."""
    context: dict = {
        "code": assignment.completion_code,
        "debrief": recruitment.debrief_paragraphs(assignment.study),
    }
    if assignment.provider == ProviderIdentity.Provider.PROLIFIC:
        context["code"] = assignment_prolific_code(assignment=assignment)
        context["finish_url"] = reverse("studies:finish", kwargs={"token": assignment.token})
    if assignment.provider == ProviderIdentity.Provider.MTURK:
        identity = ProviderIdentity.objects.filter(
            rater=assignment.rater, provider=assignment.provider
        ).first()
        extra = (identity.extra if identity else {}).get(f"study-{assignment.study_id}", {})
        if recruitment.mturk_submit_ok(extra.get("turkSubmitTo", "")):
            context["mturk_action"] = recruitment.mturk_submit_url(extra["turkSubmitTo"])
            context["mturk_assignment_id"] = extra.get("assignmentId", "")
    return context


@rater_page
@require_GET
def assignment_go(request: HttpRequest, token: str) -> HttpResponse:
    """Where the rater is now: instructions, the first unanswered trial or the debrief; a reload resumes."""
    assignment = _assignment(token)
    services.assignment_check_time(assignment=assignment)
    response = _render_step(request, assignment)
    response["Cache-Control"] = "no-store"
    return response


@rater_page
@require_POST
def instructions_done(request: HttpRequest, token: str) -> HttpResponse:
    assignment = _assignment(token)
    if _over_limit(request, str(assignment.rater.opaque_id)):
        return _too_many(request)
    if assignment.status == Assignment.Status.STARTED and assignment.consented_at:
        services.assignment_instructed(assignment=assignment)
    return _go(assignment)


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None


@rater_page
@require_POST
def trial_answer(request: HttpRequest, token: str, key: UUID) -> HttpResponse:
    """Save an answer (idempotently) and show the next step: a redirect, or for htmx the next trial."""
    trial = _rater_trial(token, key)
    assignment = trial.block.assignment
    if _over_limit(request, str(assignment.rater.opaque_id)):
        return _too_many(request)
    answer = request.POST.get("answer", "")
    try:
        services.trial_answer(
            assignment=assignment,
            trial_key=key,
            answer=answer,
            client_rt_ms=_int_or_none(request.POST.get("client_rt_ms")),
            trial=trial,
        )
    except services.TooSoon:
        return _render_step(request, assignment, notice="Please take a little longer to study the example.")
    except services.TrialNotCurrent:
        pass  # an old page (back button) or a skipped-ahead form: show where the rater really is
    except ValidationError as error:
        return HttpResponseBadRequest(" ".join(error.messages), content_type="text/plain")
    if request.htmx:
        assignment.refresh_from_db(fields=["status", "completed_at", "completion_code"])
        return _render_step(request, assignment)
    return _go(assignment)


# An image's URL holds the trial's random key and its bytes never change: the browser may keep it for good.
IMAGE_CACHE_CONTROL = "private, max-age=31536000, immutable"


def _file_response(name: str | None) -> FileResponse:
    """The stored file as it is (metadata was stripped when it was stored), streamed by the server."""
    if not name:
        raise Http404("No image.")
    response = FileResponse(default_storage.open(name, "rb"), content_type="image/png")
    del response["Content-Disposition"]  # it would carry the stored file's name
    response["Cache-Control"] = IMAGE_CACHE_CONTROL
    return response


@require_GET
def trial_image(request: HttpRequest, token: str, key: UUID, slot: int) -> HttpResponse:
    """A trial's image by its opaque URL, for the trial's own rater only."""
    return _file_response(trial_image_name(key=key, token=token, slot=slot))


@require_GET
def example_image(request: HttpRequest, token: str, slot: int) -> HttpResponse:
    """The instructions' example stimulus (1: the class A side, 2: the class B side)."""
    assignment = _assignment(token)
    if assignment.example_explanation_id is None or slot not in (1, 2):
        raise Http404("No example.")
    e = assignment.example_explanation
    return _file_response((e.query_stimulus if slot == 1 else e.distractor_stimulus).name)


@require_GET
def preview_example_image(request: HttpRequest, study_id: int, slot: int) -> HttpResponse:
    """The MTurk preview's example stimulus, for a live study: the example pair's
    (``study_preview_example``)."""
    study = get_object_or_404(Study, pk=study_id, status=Study.Status.LIVE)
    e = study_preview_example(study=study)
    if e is None or slot not in (1, 2):
        raise Http404("No example.")
    return _file_response((e.query_stimulus if slot == 1 else e.distractor_stimulus).name)


@rater_page
@require_POST
def rater_event(request: HttpRequest, token: str) -> HttpResponse:
    """Focus, blur and visibility changes the page reports (navigator.sendBeacon)."""
    assignment = _assignment(token)
    if _over_limit(request, str(assignment.rater.opaque_id)):
        return _too_many(request)
    try:
        services.rater_event_log(
            assignment=assignment,
            kind=request.POST.get("kind", ""),
            trial_key=_uuid_or_none(request.POST.get("trial")),
            client_ms=_int_or_none(request.POST.get("client_ms")),
        )
    except ValidationError as error:
        return HttpResponseBadRequest(" ".join(error.messages), content_type="text/plain")
    return HttpResponse(status=204)


def _uuid_or_none(value: str | None) -> str | None:
    try:
        return str(UUID(value)) if value else None
    except ValueError:
        return None


@rater_page
@require_GET
def assignment_finish(request: HttpRequest, token: str) -> HttpResponse:
    """Send a Prolific rater back to Prolific with the code of their outcome (completed, failed the attention
    checks, timed out), once every answer is saved."""
    assignment = _assignment(token)
    services.assignment_check_time(assignment=assignment, now=timezone.now())
    code = ""
    if assignment.provider == ProviderIdentity.Provider.PROLIFIC:
        code = assignment_prolific_code(assignment=assignment)
    if not code:
        return _go(assignment)
    return redirect(recruitment.prolific_return_url(code))
