"""The study archive: another Foil imports it as a closed study and rebuilds the same report byte for byte."""

import io
import zipfile

import pytest

from analysis.archive import study_archive_import, study_archive_write
from analysis.demo import demo_study_create
from analysis.report import report_build, report_write
from explain.models import Classifier, Dataset, Image
from studies.models import (
    Assignment,
    Block,
    ConsentText,
    ProviderIdentity,
    Rater,
    Response,
    Study,
    Trial,
)
from tests.studies.builders import data_guards_off

N_BOOT = 200


def forget(study: Study) -> None:
    """Remove every trace of the study, as if the archive were opened on another Foil."""
    with data_guards_off():
        _forget(study)


def _forget(study: Study) -> None:
    dataset, classifier = study.dataset_id, study.classifier_id
    raters = list(Assignment.objects.filter(study=study).values_list("rater_id", flat=True))
    Response.objects.filter(trial__block__assignment__study=study).delete()
    Trial.objects.filter(block__assignment__study=study).delete()
    Block.objects.filter(assignment__study=study).delete()
    Assignment.objects.filter(study=study).delete()
    ConsentText.objects.filter(study=study).delete()
    Rater.objects.filter(pk__in=raters).delete()
    study.delete()
    Classifier.objects.filter(pk=classifier).delete()
    Image.objects.filter(dataset=dataset).delete()
    Dataset.objects.filter(pk=dataset).delete()


@pytest.mark.django_db
def test_an_imported_archive_rebuilds_the_same_report_byte_for_byte(tmp_path):
    study = demo_study_create(raters_per_condition=3, n_pairs=2, pairs_per_rater=2, n_test=4, n_learning=1)
    first = Assignment.objects.filter(study=study).order_by("pk").first()
    ProviderIdentity.objects.create(rater=first.rater, provider="prolific", external_id="PIDSECRET77")
    agreed = "You may stop at any time.\n\nEthics approval: IRB-2026-117"
    with data_guards_off():  # set up as if the first rater had consented through the pages
        consent = ConsentText.objects.create(study=study, text=agreed, digest="d" * 64)
        Assignment.objects.filter(pk=first.pk).update(consent=consent, consented_at=first.started_at)
        Study.objects.filter(pk=study.pk).update(ethics_reference="IRB-2026-117")
    study.refresh_from_db()
    path = study_archive_write(study=study, path=tmp_path / "study.zip", n_boot=N_BOOT)
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        archived = {n: archive.read(n) for n in names}
    expected = {"design.json", "records.json", "responses.csv", "data_dictionary.csv", "preregistration.md",
                "SHA256SUMS", "manifest.json", "report/report.pdf", "report/tables/table5.tex"}  # fmt: skip
    assert expected <= names
    assert any(n.startswith("stimuli/") for n in names) and any(n.startswith("images/") for n in names)
    assert all(b"PIDSECRET77" not in content for content in archived.values())
    title = study.title
    forget(study)

    imported = study_archive_import(path=path)
    assert imported.status == Study.Status.CLOSED and imported.title == title
    # What raters agreed to travels with the data: the study's consent fields and each assignment's version.
    assert imported.ethics_reference == "IRB-2026-117"
    consented = Assignment.objects.filter(study=imported, consent__isnull=False).select_related("consent")
    assert [(a.consent.text, a.consented_at) for a in consented] == [(agreed, first.started_at)]
    written = report_write(report_build(study=imported, n_boot=N_BOOT), tmp_path / "rebuilt")
    rebuilt = {f"report/{p.relative_to(tmp_path / 'rebuilt')}": p.read_bytes() for p in written.values()}
    report_files = {n for n in names if n.startswith("report/")}
    assert set(rebuilt) == report_files
    for name in sorted(report_files):
        assert rebuilt[name] == archived[name], name


@pytest.mark.django_db
def test_a_changed_archive_is_refused_with_the_file_named(tmp_path):
    study = demo_study_create(raters_per_condition=2, n_pairs=2, pairs_per_rater=1, n_test=2, n_learning=1)
    path = study_archive_write(study=study, path=tmp_path / "study.zip", n_boot=N_BOOT)
    with zipfile.ZipFile(path) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    files["responses.csv"] = files["responses.csv"].replace(b",A,", b",B,", 1)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    (tmp_path / "changed.zip").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="responses.csv does not match its SHA-256"):
        study_archive_import(path=tmp_path / "changed.zip")
    with pytest.raises(ValueError, match="exists here already"):
        study_archive_import(path=path)  # the original is still here: same data set name
