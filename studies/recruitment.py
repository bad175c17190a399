"""The crowd platforms' side of a study link: who Prolific or Mechanical Turk says a rater is, where their
submission goes back to, and the consent document a review board approves.

Prolific opens ``/s/<id>/?PROLIFIC_PID=..&STUDY_ID=..&SESSION_ID=..`` and takes the rater back at
``FOIL_PROLIFIC_COMPLETE_URL?cc=<code>``. MTurk shows ``/s/<id>/?assignmentId=..&hitId=..&workerId=..
&turkSubmitTo=..`` in an iframe on its worker site (``assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE`` and usually
no ``workerId`` or ``turkSubmitTo`` while a worker previews the HIT) and expects a form POST to
``<turkSubmitTo>/mturk/externalSubmit`` carrying the current ``assignmentId``.
"""

import hashlib
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlparse

from django.conf import settings
from django.http import QueryDict

from .models import ProviderIdentity, Study

MTURK_PREVIEW = "ASSIGNMENT_ID_NOT_AVAILABLE"
PROLIFIC_FIELDS = ("STUDY_ID", "SESSION_ID")
MTURK_FIELDS = ("assignmentId", "hitId", "turkSubmitTo")

DEFAULT_CONSENT = (
    "Your answers and the time you take are recorded for research. We do not record your name. Your "
    "participant id is kept apart from your answers and used only for payment. Taking part is voluntary and "
    "you may stop at any time by closing this window."
)
DEFAULT_DEBRIEF = (
    "The examples you saw came from different ways of explaining what a computer vision model has learned; "
    "we compare how well each one teaches people. The kinds were given neutral names so that nobody could "
    "answer from the names alone."
)


@dataclass(frozen=True)
class Arrival:
    """Who the recruitment platform says this is, read from the study link's query (or the consent form)."""

    provider: str
    external_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    preview: bool = False  # an MTurk worker looking at the HIT before accepting it

    @property
    def is_direct(self) -> bool:
        return self.provider == ProviderIdentity.Provider.DIRECT

    @property
    def is_mturk(self) -> bool:
        return self.provider == ProviderIdentity.Provider.MTURK

    def hidden_fields(self) -> dict[str, str]:
        """The query parameters the consent form sends on, so the POST knows the same person."""
        if self.provider == ProviderIdentity.Provider.PROLIFIC:
            return {"PROLIFIC_PID": self.external_id or "", **self.extra}
        if self.is_mturk:
            return {"workerId": self.external_id or "", **self.extra}
        return {}


def arrival_from(params: QueryDict | dict) -> Arrival:
    """The arrival a study link's parameters describe: Prolific, MTurk (or its preview) or the direct link."""
    if params.get("PROLIFIC_PID") is not None:
        return Arrival(
            ProviderIdentity.Provider.PROLIFIC,
            params.get("PROLIFIC_PID", ""),
            {k: params.get(k, "") for k in PROLIFIC_FIELDS},
        )
    if params.get("assignmentId") is not None:
        return Arrival(
            ProviderIdentity.Provider.MTURK,
            params.get("workerId", ""),
            {k: params.get(k, "") for k in MTURK_FIELDS},
            preview=params.get("assignmentId") == MTURK_PREVIEW,
        )
    return Arrival(ProviderIdentity.Provider.DIRECT)


def mturk_submit_ok(turk_submit_to: str) -> bool:
    """Whether ``turk_submit_to`` is one of MTurk's own hosts (``FOIL_MTURK_SUBMIT_TO``): a forged link must
    not send a rater's code elsewhere."""
    return turk_submit_to.rstrip("/") in {u.rstrip("/") for u in settings.FOIL_MTURK_SUBMIT_TO}


MTURK_SANDBOX_HOST = "workersandbox.mturk.com"


def mturk_is_sandbox(turk_submit_to: str) -> bool:
    """Whether the HIT came from MTurk's sandbox, where researchers and colleagues try a HIT unpaid: its
    assignments are pilots (left out of balance counts and the analysis), never data."""
    return urlparse(turk_submit_to or "").hostname == MTURK_SANDBOX_HOST


def mturk_submit_url(turk_submit_to: str) -> str:
    return turk_submit_to.rstrip("/") + "/mturk/externalSubmit"


def prolific_return_url(code: str) -> str:
    return f"{settings.FOIL_PROLIFIC_COMPLETE_URL}?{urlencode({'cc': code})}"


def frame_ancestors_policy() -> str:
    """The Content-Security-Policy of rater pages: only MTurk's worker sites may frame them."""
    return "frame-ancestors " + (" ".join(settings.FOIL_RATER_FRAME_ANCESTORS) or "'none'")


@dataclass(frozen=True)
class ConsentDocument:
    """What a rater agrees to: the study's consent text and its pay, duration, contact and ethics approval."""

    paragraphs: list[str]
    details: list[tuple[str, str]]

    @property
    def text(self) -> str:
        """The plain text stored with each consent (``ConsentText``)."""
        return "\n\n".join([*self.paragraphs, "\n".join(f"{k}: {v}" for k, v in self.details)]).strip()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def consent_document(study: Study) -> ConsentDocument:
    details = [
        ("Pay", study.pay),
        ("Expected duration", f"about {study.expected_minutes} minutes" if study.expected_minutes else ""),
        ("Researcher contact", study.contact),
        ("Ethics approval", study.ethics_reference),
    ]
    return ConsentDocument(
        _paragraphs(study.consent_text or DEFAULT_CONSENT), [(k, v) for k, v in details if v]
    )


def debrief_paragraphs(study: Study) -> list[str]:
    return _paragraphs(study.debrief_text or DEFAULT_DEBRIEF)
