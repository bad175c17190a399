"""A study archive for others to check: one zip with the design, the pre-registration, the stimuli with their
configs, the consent texts raters agreed to, the anonymised responses, the report and its data dictionary, and
a SHA-256 of every file.

``study_archive_write`` writes it (deterministically: fixed file times, sorted names);
``study_archive_import`` verifies every checksum and recreates the study, closed, with its data set records,
class pairs, conditions, explanations (stimulus files), raters (opaque ids only), assignments, trials and
answers, so ``report_build`` on the imported study gives the same report byte for byte. Provider identities
(worker ids, Prolific PIDs) are never written.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from datetime import datetime
from pathlib import Path

from django.core.files.base import ContentFile
from django.db import transaction

from explain.models import Classifier, ClassLabel, Dataset, Explanation, Image
from studies.models import (
    Assignment,
    Block,
    ClassPair,
    Condition,
    ConsentText,
    Rater,
    Response,
    Study,
    Trial,
)

from .report import report_build, report_write
from .selectors import COLUMN_NAMES, data_dictionary, responses_tidy, rows_to_csv

FORMAT = "foil-study-archive/1"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
STUDY_FIELDS = (
    "title",
    "description",
    "n_prelearning",
    "n_learning",
    "n_test",
    "label_a",
    "label_b",
    "blur_sigma",
    "design",
    "pairs_per_assignment",
    "min_learning_seconds",
    "time_limit_minutes",
    "seed",
    "exclusion_rules",
    "catch_trials_per_pair",
    "min_rt_ms",
    "version",
    "preregistration",
    # What raters were told (the consent and debrief a review board approved); each assignment in records.json
    # names the consent text version it agreed to.
    "consent_text",
    "debrief_text",
    "pay",
    "expected_minutes",
    "contact",
    "ethics_reference",
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _read(file) -> bytes:
    with file.open("rb") as f:
        return f.read()


def _design(study: Study) -> tuple[dict, dict[str, bytes]]:
    """The study's design as JSON records (keys are the origin's ids) and the files it needs."""
    files: dict[str, bytes] = {}
    dataset, classifier = study.dataset, study.classifier
    images = {}
    explanations = list(Explanation.objects.filter(study=study).select_related("condition").order_by("pk"))
    image_ids = set(Trial.objects.filter(block__assignment__study=study).values_list("image_id", flat=True))
    image_ids |= {e.query_image_id for e in explanations}
    for image in Image.objects.filter(pk__in=image_ids - {None}).select_related("class_label").order_by("pk"):
        name = f"images/{image.pk}{Path(image.file.name).suffix or '.png'}"
        files[name] = _read(image.file)
        images[image.pk] = {
            "source_id": image.source_id,
            "class": image.class_label.name,
            "split": image.split,
            "file": name,
            "keypoints": image.keypoints,
            "attributes": image.attributes,
        }
    records = []
    for e in explanations:
        entry = {
            "id": e.pk,
            "pair": e.pair_id,
            "condition": e.condition_id,
            "key": e.key,
            "query_image": e.query_image_id,
            "flipped": e.flipped,
            "edits": e.edits,
            "metrics": e.metrics,
            "config": e.config,
        }
        for field in ("query_stimulus", "distractor_stimulus", "masks"):
            name = f"stimuli/{e.pk}-{field}{Path(getattr(e, field).name).suffix}"
            files[name] = _read(getattr(e, field))
            entry[field] = name
        records.append(entry)
    design = {
        "study": {f: getattr(study, f) for f in STUDY_FIELDS}
        | {"launched_at": _iso(study.launched_at), "preregistered_at": _iso(study.preregistered_at)},
        "dataset": {
            "name": dataset.name,
            "kind": dataset.kind,
            "root_path": dataset.root_path,
            "image_width": dataset.image_width,
            "image_height": dataset.image_height,
            "classes": list(dataset.classes.order_by("index").values_list("index", "name")),
        },
        "classifier": {
            f: getattr(classifier, f)
            for f in (
                "name",
                "architecture",
                "checkpoint_path",
                "checkpoint_prefix",
                "in_channels",
                "options",
                "split_point",
                "input_size",
                "normalisation",
                "test_accuracy",
                "evaluation",
                "provenance",
            )
        },
        "pairs": [
            {
                "id": p.pk,
                "class_a": p.class_a.name,
                "class_b": p.class_b.name,
                "mined_by": p.mined_by,
                "confusion_score": p.confusion_score,
            }
            for p in study.pairs.select_related("class_a", "class_b").order_by("pk")
        ],
        "conditions": [
            {"id": c.pk, "method": c.method, "setup": c.setup} for c in study.conditions.order_by("pk")
        ],
        "images": images,
        "explanations": records,
    }
    return design, files


def _records(study: Study) -> dict:
    """Consent text versions, raters (opaque ids), assignments, blocks, trials and responses; no provider
    identity."""
    assignments = list(Assignment.objects.filter(study=study).select_related("rater").order_by("pk"))
    consents = ConsentText.objects.filter(study=study).order_by("pk")
    blocks = list(Block.objects.filter(assignment__study=study).order_by("pk"))
    trials = list(Trial.objects.filter(block__assignment__study=study).order_by("pk"))
    responses = list(Response.objects.filter(trial__block__assignment__study=study).order_by("pk"))
    return {
        "consent_texts": [
            {"id": c.pk, "text": c.text, "digest": c.digest, "created_at": _iso(c.created_at)}
            for c in consents
        ],
        "assignments": [
            {
                "id": a.pk,
                "rater": str(a.rater.opaque_id),
                "simulated": a.rater.is_simulated,
                "study_version": a.study_version,
                "provider": a.provider,
                "status": a.status,
                "seed": a.seed,
                "consent": a.consent_id,
                "consented_at": _iso(a.consented_at),
                "started_at": _iso(a.started_at),
                "completed_at": _iso(a.completed_at),
            }
            for a in assignments
        ],
        "blocks": [
            {
                "id": b.pk,
                "assignment": b.assignment_id,
                "position": b.position,
                "pair": b.pair_id,
                "condition": b.condition_id,
                "a_on_left": b.a_on_left,
            }
            for b in blocks
        ],
        "trials": [
            {
                "id": t.pk,
                "block": t.block_id,
                "phase": t.phase,
                "position": t.position,
                "image": t.image_id,
                "explanation": t.explanation_id,
                "correct_answer": t.correct_answer,
                "is_catch": t.is_catch,
            }
            for t in trials
        ],
        "responses": [
            {
                "trial": r.trial_id,
                "phase": r.phase,
                "answer": r.answer,
                "client_rt_ms": r.client_rt_ms,
                "server_rt_ms": r.server_rt_ms,
                "client_sent_at": _iso(r.client_sent_at),
                "too_fast": r.too_fast,
                "received_at": _iso(r.received_at),
            }
            for r in responses
        ],
    }


def _json(value: object) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True, default=str) + "\n").encode()


def study_archive_write(*, study: Study, path: Path, n_boot: int = 2000) -> Path:
    """Write the archive of ``study`` to ``path`` (a .zip) and return it."""
    import tempfile

    design, files = _design(study)
    files["design.json"] = _json(design)
    files["records.json"] = _json(_records(study))
    files["responses.csv"] = rows_to_csv(responses_tidy(study=study), COLUMN_NAMES).encode()
    files["data_dictionary.csv"] = rows_to_csv(data_dictionary(), ["column", "type", "description"]).encode()
    report = report_build(study=study, n_boot=n_boot)
    files["preregistration.md"] = report.meta["preregistration_document"].encode()
    with tempfile.TemporaryDirectory() as tmp:
        for written in report_write(report, Path(tmp)).values():
            files[f"report/{written.relative_to(tmp)}"] = written.read_bytes()
    files["manifest.json"] = _json(
        {
            "format": FORMAT,
            "title": study.title,
            "version": study.version,
            "bootstrap_resamples": n_boot,
            "software": report.meta["software"],
        }
    )
    sums = "".join(f"{hashlib.sha256(files[name]).hexdigest()}  {name}\n" for name in sorted(files))
    files["SHA256SUMS"] = sums.encode()
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, files[name])
    return path


def archive_verify(archive: zipfile.ZipFile) -> dict[str, bytes]:
    """Every file of the archive, after checking it against SHA256SUMS; a mismatch names the file."""
    files = {name: archive.read(name) for name in archive.namelist()}
    if "SHA256SUMS" not in files:
        raise ValueError("not a Foil study archive: SHA256SUMS is missing")
    listed = {}
    for line in files["SHA256SUMS"].decode().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    for name, digest in listed.items():
        if name not in files:
            raise ValueError(f"the archive lists {name} in SHA256SUMS but does not contain it")
        if hashlib.sha256(files[name]).hexdigest() != digest:
            raise ValueError(
                f"{name} does not match its SHA-256 in SHA256SUMS: the archive was changed or damaged"
            )
    extra = set(files) - set(listed) - {"SHA256SUMS"}
    if extra:
        raise ValueError(f"files not covered by SHA256SUMS: {sorted(extra)}")
    manifest = json.loads(files["manifest.json"])
    if manifest.get("format") != FORMAT:
        raise ValueError(f"archive format {manifest.get('format')!r}; this Foil reads {FORMAT!r}")
    return files


@transaction.atomic
def study_archive_import(*, path: Path) -> Study:
    """Recreate the archived study here, closed (its data can only be read). Returns the new study."""
    with zipfile.ZipFile(path) as archive:
        files = archive_verify(archive)
    design, records = json.loads(files["design.json"]), json.loads(files["records.json"])
    d = design["dataset"]
    if Dataset.objects.filter(name=d["name"]).exists():
        raise ValueError(
            f"a data set called {d['name']!r} exists here already; import into a Foil without it"
        )
    dataset = Dataset.objects.create(
        name=d["name"],
        kind=d["kind"],
        root_path=d["root_path"],
        image_width=d["image_width"],
        image_height=d["image_height"],
    )
    labels = {
        name: ClassLabel.objects.create(dataset=dataset, index=i, name=name) for i, name in d["classes"]
    }
    classifier = Classifier.objects.create(dataset=dataset, **design["classifier"])
    s = design["study"]
    study = Study.objects.create(
        dataset=dataset,
        classifier=classifier,
        status=Study.Status.READY,  # closed at the end: rows of a frozen study cannot be inserted
        launched_at=_time(s.pop("launched_at")),
        preregistered_at=_time(s.pop("preregistered_at")),
        **s,
    )
    pairs = {
        p["id"]: ClassPair.objects.create(
            study=study,
            class_a=labels[p["class_a"]],
            class_b=labels[p["class_b"]],
            mined_by=p["mined_by"],
            confusion_score=p["confusion_score"],
        )
        for p in design["pairs"]
    }
    conditions = {
        c["id"]: Condition.objects.create(study=study, method=c["method"], setup=c["setup"])
        for c in design["conditions"]
    }
    images = {}
    for key, i in sorted(design["images"].items(), key=lambda kv: int(kv[0])):
        images[int(key)] = Image.objects.create(
            dataset=dataset,
            class_label=labels[i["class"]],
            source_id=i["source_id"],
            split=i["split"],
            keypoints=i["keypoints"],
            attributes=i["attributes"],
            file=ContentFile(files[i["file"]], name=Path(i["file"]).name),
        )
    explanations = {}
    for e in design["explanations"]:
        stimuli = {
            f: ContentFile(files[e[f]], name=Path(e[f]).name)
            for f in ("query_stimulus", "distractor_stimulus", "masks")
        }
        explanations[e["id"]] = Explanation.objects.create(
            study=study,
            pair=pairs[e["pair"]],
            condition=conditions[e["condition"]],
            key=f"imported-{e['key']}",
            query_image=images[e["query_image"]],
            flipped=e["flipped"],
            edits=e["edits"],
            metrics=e["metrics"],
            config=e["config"],
            **stimuli,
        )
    consents = {}
    for c in records.get("consent_texts", []):  # archives written before consent versions have none
        consents[c["id"]] = ConsentText.objects.create(study=study, text=c["text"], digest=c["digest"])
        ConsentText.objects.filter(pk=consents[c["id"]].pk).update(created_at=_time(c["created_at"]))
    assignments = {}
    for a in records["assignments"]:
        rater = Rater.objects.create(opaque_id=a["rater"], is_simulated=a["simulated"])
        assignments[a["id"]] = Assignment.objects.create(
            rater=rater,
            study=study,
            study_version=a["study_version"],
            provider=a["provider"],
            status=a["status"],
            seed=a["seed"],
            consent=consents.get(a.get("consent")),
            consented_at=_time(a.get("consented_at")),
            completed_at=_time(a["completed_at"]),
        )
    blocks = {
        b["id"]: Block.objects.create(
            assignment=assignments[b["assignment"]],
            position=b["position"],
            pair=pairs[b["pair"]],
            condition=conditions[b["condition"]],
            a_on_left=b["a_on_left"],
        )
        for b in records["blocks"]
    }
    trials = {}
    for t in records["trials"]:
        trials[t["id"]] = Trial.objects.create(
            block=blocks[t["block"]],
            phase=t["phase"],
            position=t["position"],
            correct_answer=t["correct_answer"],
            image=images.get(t["image"]),
            explanation=explanations.get(t["explanation"]),
            is_catch=t["is_catch"],
        )
    created = Response.objects.bulk_create(
        Response(
            trial=trials[r["trial"]],
            phase=r["phase"],
            answer=r["answer"],
            client_rt_ms=r["client_rt_ms"],
            server_rt_ms=r["server_rt_ms"],
            client_sent_at=_time(r["client_sent_at"]),
            too_fast=r["too_fast"],
        )
        for r in records["responses"]
    )
    for response, r in zip(created, records["responses"], strict=True):
        response.received_at = _time(r["received_at"])
    Response.objects.bulk_update(created, ["received_at"])
    for a in records["assignments"]:
        Assignment.objects.filter(pk=assignments[a["id"]].pk).update(started_at=_time(a["started_at"]))
    Study.objects.filter(pk=study.pk).update(status=Study.Status.CLOSED)
    study.refresh_from_db()
    return study
