"""Reads for the analysis: the tidy export of a study's responses, its raters, its explanations' metrics and
its progress. Provider identities (worker ids, Prolific PIDs) are never read here, so they cannot reach an
export."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from django.db.models import Count, Max, Min

from explain.models import Backbone, Explanation, Image
from studies.models import Assignment, Phase, Response, Study, Trial
from studies.selectors import assignment_prolific_code, corrections_apply, study_corrections

from . import stats

# The data dictionary of the tidy export: column, type, meaning. One row per response.
TIDY_COLUMNS: list[tuple[str, str, str]] = [
    ("response", "integer", "Response id."),
    ("study", "integer", "Study id."),
    ("study_title", "text", "Study title."),
    ("study_version", "integer", "Version of the study design the rater took (raised on each launch)."),
    ("assignment", "integer", "Assignment id (one per rater and study)."),
    ("rater", "uuid", "Opaque rater id; provider ids (worker id, Prolific PID) are never exported."),
    ("rater_simulated", "boolean", "True for simulated raters (not people)."),
    (
        "provider",
        "text",
        "Recruitment channel: direct, mturk or prolific (the channel, not the person's id).",
    ),
    ("assignment_status", "text", "started, completed, returned, timed_out or excluded."),
    (
        "completion_code",
        "text",
        (
            "The code the rater took back to their platform, to match its submission list: their own code "
            "(direct link, MTurk; empty until done), or for Prolific the study's code for their outcome "
            "(completed, failed attention checks, timed out)."
        ),
    ),
    ("assignment_seed", "integer", "Seed of the rater's image order and answer-button sides."),
    ("block_position", "integer", "Order of the class pair within the assignment (0 first)."),
    ("a_on_left", "boolean", "Whether the class A button was on the left."),
    ("pair", "integer", "Class pair id."),
    ("class_a", "text", "True name of class A (the query class; raters saw only the display label)."),
    ("class_b", "text", "True name of class B (the distractor class)."),
    ("condition", "integer", "Condition id (method x pair-selection setup)."),
    ("method", "text", "Counterfactual method taught in the learning phase."),
    (
        "setup",
        "text",
        (
            "Pair-selection setup of the learning stimuli: random or consistent (semantically consistent "
            "pairs; exports made before the rename say 'semantic', read as 'consistent')."
        ),
    ),
    ("phase", "text", "pre (pre-learning), learning or test."),
    ("trial", "integer", "Trial id."),
    ("position", "integer", "Position of the trial within its phase (0 first)."),
    ("is_catch", "boolean", "Catch trial (attention check); left out of accuracy, used by exclusion rules."),
    ("image", "integer", "Image id shown (pre-learning and test trials)."),
    ("explanation", "integer", "Explanation id shown (learning trials)."),
    ("correct_answer", "text", "A or B (pre-learning and test); empty for learning."),
    ("answer", "text", "A, B, D (don't know, pre-learning only) or seen (learning)."),
    ("correct", "integer", "1 when answer = correct_answer, else 0 (D counts as 0); empty for learning."),
    ("dont_know", "boolean", "The answer was don't know."),
    ("client_rt_ms", "integer", "Reaction time measured in the browser (ms); empty when not reported."),
    ("server_rt_ms", "integer", "Reaction time measured on the server (ms)."),
    ("client_sent_at", "datetime", "When the browser sent the answer (ISO 8601, UTC)."),
    ("received_at", "datetime", "When the server stored the answer (ISO 8601, UTC)."),
    ("excluded", "boolean", "The rater is excluded by a declared exclusion rule; left out of the analysis."),
    ("exclusion_reasons", "text", "Why, rule by rule, separated by '; '; empty when kept."),
    (
        "corrections",
        "text",
        "Researchers' corrections applied to this row (id, kind, author: reason; the report lists them); "
        "correct_answer and correct already include them; empty when none.",
    ),
]
COLUMN_NAMES = [name for name, _, _ in TIDY_COLUMNS]


def data_dictionary() -> list[dict[str, str]]:
    return [{"column": n, "type": t, "description": d} for n, t, d in TIDY_COLUMNS]


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def study_assignments(*, study: Study) -> pd.DataFrame:
    """One row per assignment: rater (opaque id), simulated flag, status, provider channel, version."""
    records = [
        {
            "assignment": a.pk,
            "rater": str(a.rater.opaque_id),
            "rater_simulated": a.rater.is_simulated,
            "assignment_status": a.status,
            "provider": a.provider,
            "study_version": a.study_version,
        }  # fmt: skip
        for a in Assignment.objects.filter(study=study, is_pilot=False).select_related("rater").order_by("pk")
    ]
    columns = ["assignment", "rater", "rater_simulated", "assignment_status", "provider", "study_version"]
    return pd.DataFrame.from_records(records, columns=columns)


def _response_records(study: Study) -> list[dict]:
    responses = (
        Response.objects.filter(
            trial__block__assignment__study=study, trial__block__assignment__is_pilot=False
        )
        .select_related(
            "trial__block__assignment__rater",
            "trial__block__pair__class_a",
            "trial__block__pair__class_b",
            "trial__block__condition",
        )
        .order_by("trial__block__assignment_id", "trial__block__position", "received_at", "pk")
    )
    records = []
    codes: dict[int, str] = {}  # the code each rater took back, once per assignment
    for r in responses:
        trial, block = r.trial, r.trial.block
        assignment = block.assignment
        if assignment.pk not in codes:
            codes[assignment.pk] = (
                assignment_prolific_code(assignment=assignment)
                if assignment.provider == "prolific"
                else assignment.completion_code
            )
        answered = trial.phase in (Phase.PRE_LEARNING, Phase.TEST)
        records.append(
            {
                "response": r.pk,
                "study": study.pk,
                "study_title": study.title,
                "study_version": assignment.study_version,
                "assignment": assignment.pk,
                "rater": str(assignment.rater.opaque_id),
                "rater_simulated": assignment.rater.is_simulated,
                "provider": assignment.provider,
                "assignment_status": assignment.status,
                "completion_code": codes[assignment.pk],
                "assignment_seed": assignment.seed,
                "block_position": block.position,
                "a_on_left": block.a_on_left,
                "pair": block.pair_id,
                "class_a": block.pair.class_a.name,
                "class_b": block.pair.class_b.name,
                "condition": block.condition_id,
                "method": block.condition.method,
                "setup": block.condition.setup,
                "phase": trial.phase,
                "trial": trial.pk,
                "position": trial.position,
                "is_catch": trial.is_catch,
                "image": trial.image_id,
                "explanation": trial.explanation_id,
                "correct_answer": trial.correct_answer,
                "answer": r.answer,
                "correct": int(r.answer == trial.correct_answer) if answered else None,
                "dont_know": r.answer == "D",
                "client_rt_ms": r.client_rt_ms,
                "server_rt_ms": r.server_rt_ms,
                "client_sent_at": _iso(r.client_sent_at),
                "received_at": _iso(r.received_at),
            }
        )
    return records


def responses_tidy(*, study: Study) -> list[dict]:
    """The tidy export: one dict per response with every design factor and the exclusion flags of its rater
    (the study's declared exclusion rules applied to all of the rater's responses)."""
    records = _response_records(study)
    exclusions = rater_exclusions(study=study, records=records)
    by_rater = {row.rater: row for row in exclusions.itertuples()}
    for record in records:
        verdict = by_rater.get(record["rater"])
        # A dropped assignment's reason is written per response by corrections_apply, once.
        reasons = (
            [r for r in verdict.reasons if not r.startswith(stats.DROPPED_BY_CORRECTION)] if verdict else []
        )
        record["excluded"] = bool(reasons)
        record["exclusion_reasons"] = "; ".join(reasons)
    return corrections_apply(records, study_corrections(study=study))


def responses_frame(*, study: Study) -> pd.DataFrame:
    return pd.DataFrame.from_records(responses_tidy(study=study), columns=COLUMN_NAMES)


def rater_exclusions(*, study: Study, records: list[dict] | None = None) -> pd.DataFrame:
    """Per rater: whether the study's declared rules exclude them, and why (``stats.exclusions_evaluate``),
    judged on the responses with the researchers' corrections applied (a corrected catch trial's key counts);
    a rater whose assignment a correction dropped is excluded with that correction as the reason
    (``stats.DROPPED_BY_CORRECTION``)."""
    if records is None:
        records = _response_records(study)
    corrections = study_corrections(study=study)
    corrected = corrections_apply([dict(r) for r in records], corrections)
    rows = pd.DataFrame.from_records(corrected, columns=[c for c in COLUMN_NAMES if c not in ("excluded",)])
    assignments = study_assignments(study=study)
    evaluated = stats.exclusions_evaluate(assignments, rows, study.exclusion_rules or {})
    rater_of = dict(zip(assignments["assignment"], assignments["rater"], strict=True))
    dropped: dict[str, list[str]] = {}
    for c in corrections:
        if c["kind"] == "drop_assignment" and c["assignment"] in rater_of:
            dropped.setdefault(rater_of[c["assignment"]], []).append(
                f"{stats.DROPPED_BY_CORRECTION} {c['correction']}: {c['reason']}"
            )
    if dropped:
        evaluated["reasons"] = [
            [*reasons, *dropped.get(rater, [])]
            for rater, reasons in zip(evaluated["rater"], evaluated["reasons"], strict=True)
        ]
        evaluated["excluded"] = evaluated["reasons"].map(bool)
    return evaluated


def explanation_metrics(*, study: Study) -> pd.DataFrame:
    """One row per explanation: pair, method, setup and its automatic metrics (missing keys stay empty)."""
    records = []
    explanations = Explanation.objects.filter(study=study).select_related("condition").order_by("pk")
    for e in explanations:
        metrics = e.metrics if isinstance(e.metrics, dict) else {}
        flipped = metrics.get("flipped", e.flipped)
        records.append(
            {
                "explanation": e.pk,
                "pair": e.pair_id,
                "method": e.condition.method,
                "setup": e.condition.setup,
                "near_kp": metrics.get("near_kp"),
                "same_kp": metrics.get("same_kp"),
                "n_edits": metrics.get(
                    "n_edits", len(e.edits) if isinstance(e.edits, list) and e.edits else None
                ),
                "flip_rate": float(bool(flipped)) if flipped is not None else None,
                "cout": metrics.get("cout"),
            }
        )
    columns = ["explanation", "pair", "method", "setup", *stats.METRIC_KEYS]
    return pd.DataFrame.from_records(records, columns=columns)


def study_progress(*, study: Study) -> dict:
    """How far a study is: assignments per status, completed assignments per condition, response counts.
    Pilot assignments (the researcher trying the study) are counted apart and nowhere else: the analysis
    leaves them out."""
    counted = Assignment.objects.filter(study=study, is_pilot=False)
    by_status = dict(counted.values_list("status").annotate(n=Count("pk")).order_by("status"))
    completed_blocks = (
        counted.filter(status=Assignment.Status.COMPLETED)
        .values("blocks__condition__method", "blocks__condition__setup")
        .annotate(n=Count("pk", distinct=True))
        .order_by("blocks__condition__method", "blocks__condition__setup")
    )
    per_condition = [
        {
            "method": row["blocks__condition__method"],
            "setup": row["blocks__condition__setup"],
            "completed_assignments": row["n"],
        }  # fmt: skip
        for row in completed_blocks
        if row["blocks__condition__method"] is not None
    ]
    responses = Response.objects.filter(
        trial__block__assignment__study=study, trial__block__assignment__is_pilot=False
    )
    return {
        "study": study.pk,
        "title": study.title,
        "status": study.status,
        "version": study.version,
        "assignments": {status: by_status.get(status, 0) for status in Assignment.Status.values},
        "pilot_assignments": Assignment.objects.filter(study=study, is_pilot=True).count(),
        "simulated_raters": counted.filter(rater__is_simulated=True).count(),
        "completed_per_condition": per_condition,
        "responses": responses.count(),
        "responses_per_phase": dict(responses.values_list("phase").annotate(n=Count("pk")).order_by("phase")),
    }


def rows_to_csv(rows: Iterable[dict], columns: list[str]) -> str:
    """CSV text of dict rows with exactly ``columns`` (empty cells for None)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return out.getvalue()


def _sha256(path: str) -> str:
    """SHA-256 of a file, or of a directory's files (path and hash of each, sorted); '' when absent."""
    root = Path(path)
    if root.is_file():
        digest = hashlib.sha256()
        with root.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    if root.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(root)}\0{_sha256(str(file))}\n".encode())
        return digest.hexdigest()
    return ""


def _flat(config: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, object] = {}
    for key in sorted(config):
        out |= _flat(config[key], f"{prefix}.{key}" if prefix else str(key))
    return out


# Config keys that name one stimulus or the worker's bookkeeping of it (its unit, the units batched with it),
# not a setting: left out of the provenance settings, so that a condition's stimuli made alike share one row.
PER_STIMULUS_KEYS = ("seed", "key", "pair", "query_image", "work_unit", "batch")


def condition_provenance(*, study: Study) -> pd.DataFrame:
    """Per condition: method, variant and every setting as stored in its explanations' configs (one row per
    distinct config; ``explanations`` counts them), so each stimulus can be regenerated."""
    records = []
    explanations = Explanation.objects.filter(study=study).select_related("condition").order_by("pk")
    seen: dict[tuple, dict] = {}
    for e in explanations:
        config = e.config if isinstance(e.config, dict) else {}
        settings_ = {k: v for k, v in _flat(config).items() if k not in PER_STIMULUS_KEYS}
        key = (e.condition.method, e.condition.setup, json.dumps(settings_, sort_keys=True, default=str))
        if key not in seen:
            seen[key] = {"method": e.condition.method, "setup": e.condition.setup,
                         "variant": str(config.get("variant", config.get("name", ""))),
                         "settings": "; ".join(f"{k}={v}" for k, v in settings_.items()),
                         "explanations": 0}  # fmt: skip
            records.append(seen[key])
        seen[key]["explanations"] += 1
    return pd.DataFrame.from_records(
        records, columns=["method", "setup", "variant", "settings", "explanations"]
    )


def model_provenance(*, study: Study) -> pd.DataFrame:
    """The classifier and every backbone the explanations' configs name: kind, how it came to the platform
    (trained, registered or shipped: its provenance's ``source``), path, SHA-256 of the weights, and their
    quality card (test accuracy; the backbone's recorded evaluation)."""
    classifier = study.classifier
    records = [
        {
            "role": "classifier",
            "name": classifier.name,
            "kind": classifier.architecture,
            "source": (classifier.provenance or {}).get("source", "not recorded"),
            "path": classifier.checkpoint_path,
            "sha256": _sha256(classifier.checkpoint_path),
            "quality": f"test accuracy {classifier.test_accuracy:.4f}"
            if classifier.test_accuracy is not None
            else "test accuracy not recorded",
        }  # fmt: skip
    ]
    configs = list(Explanation.objects.filter(study=study).values_list("config", flat=True))
    named: set[int] = (
        set()
    )  # the backbones' ids, as the worker stores them, and the models they were used with
    for config in configs:
        named.update(v for v in (config.get("backbones") or {}).values() if isinstance(v, int))
        if isinstance(config.get("auxiliary"), int):
            named.add(config["auxiliary"])
    for partner in Backbone.objects.filter(pk__in=named).values_list("config", flat=True):
        if isinstance(partner.get("autoencoder"), int):
            named.add(partner["autoencoder"])
    text = json.dumps(configs)
    for backbone in Backbone.objects.order_by("kind", "name"):
        mentioned = f'"{backbone.name}"' in text or f'"{backbone.path}"' in text
        if backbone.pk not in named and not mentioned:
            continue
        provenance = backbone.provenance if isinstance(backbone.provenance, dict) else {}
        quality = provenance.get("quality", provenance.get("evaluation", ""))
        card = json.dumps(quality, sort_keys=True) if quality else "not recorded"
        records.append(
            {"role": "backbone", "name": backbone.name, "kind": backbone.kind,
             "source": provenance.get("source", "not recorded"), "path": backbone.path,
             "sha256": _sha256(backbone.path), "quality": card}
        )  # fmt: skip
    return pd.DataFrame.from_records(
        records, columns=["role", "name", "kind", "source", "path", "sha256", "quality"]
    )


def image_provenance(*, study: Study) -> pd.DataFrame:
    """Per class pair: the data set's ids of the images shown in pre-learning, in test and as learning
    queries, and how they
    overlap (the paper shows the same images before and after learning; learning images should be others)."""
    shown: dict[int, dict[str, set[int]]] = {}
    trials = Trial.objects.filter(block__assignment__study=study, is_catch=False).values_list(
        "block__pair_id", "phase", "image_id"
    )
    for pair_id, phase, image_id in trials:
        if image_id is not None:
            shown.setdefault(pair_id, {"pre": set(), "test": set(), "learning": set()})[
                "pre" if phase == Phase.PRE_LEARNING else "test"
            ].add(image_id)
    for pair_id, image_id in Explanation.objects.filter(study=study).values_list("pair_id", "query_image_id"):
        shown.setdefault(pair_id, {"pre": set(), "test": set(), "learning": set()})["learning"].add(image_id)
    labels = {p.pk: str(p) for p in study.pairs.select_related("class_a", "class_b")}
    source = dict(Image.objects.filter(dataset=study.dataset_id).values_list("pk", "source_id"))

    def ids(images: set[int]) -> str:
        return " ".join(sorted(source[i] for i in images))

    records = []
    for pair_id in sorted(shown, key=lambda p: labels.get(p, "")):
        s = shown[pair_id]
        records.append({"pair_label": labels.get(pair_id, ""), "pre_images": ids(s["pre"]),
                        "test_images": ids(s["test"]), "learning_query_images": ids(s["learning"]),
                        "pre_test_overlap": len(s["pre"] & s["test"]),
                        "learning_test_overlap": len(s["learning"] & s["test"])})  # fmt: skip
    columns = ["pair_label", "pre_images", "test_images", "learning_query_images", "pre_test_overlap"]
    return pd.DataFrame.from_records(records, columns=[*columns, "learning_test_overlap"])


def collection_dates(*, study: Study) -> dict[str, str]:
    """First and last stored answer (ISO 8601, UTC) and the launch time."""
    span = Response.objects.filter(trial__block__assignment__study=study).aggregate(
        first=Min("received_at"), last=Max("received_at")
    )
    return {
        "launched_at": _iso(study.launched_at) or "",
        "first_response": _iso(span["first"]) or "",
        "last_response": _iso(span["last"]) or "",
    }


# Setup names of older exports and what they are called now (studies migration 0007).
LEGACY_SETUPS = {"semantic": "consistent"}


def tidy_read(source: str | Path | io.StringIO) -> pd.DataFrame:
    """A tidy export (CSV) as a DataFrame, with setup names of older exports renamed to today's, so an export
    made before a rename still analyses with the names the report uses."""
    rows = pd.read_csv(source, dtype={"setup": str, "method": str, "answer": str, "correct_answer": str})
    missing = [c for c in ("rater", "method", "setup", "phase", "correct") if c not in rows.columns]
    if missing:
        raise ValueError(
            f"not a tidy export: the columns {missing} are missing; export with the responses API"
        )
    rows["setup"] = rows["setup"].replace(LEGACY_SETUPS)
    return rows
