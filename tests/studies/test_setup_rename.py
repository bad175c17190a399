"""The setup once called "semantic" is "consistent" (a method is called semantic): the data migration renames
stored conditions both ways, and exports made before the rename still read with the new name."""

import io

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from analysis.selectors import tidy_read
from explain.methods import method_names
from explain.models import Classifier, Dataset
from studies.models import Condition

BEFORE, AFTER = (
    ("studies", "0009_study_preregistration"),
    ("studies", "0010_setup_semantic_renamed_consistent"),
)


def test_no_setup_shares_a_name_with_a_method():
    assert not set(Condition.Setup.values) & set(method_names())


@pytest.mark.django_db(transaction=True)
def test_migration_renames_stored_setups_and_back():
    executor = MigrationExecutor(connection)
    executor.migrate([BEFORE])
    old = executor.loader.project_state([BEFORE]).apps
    dataset = Dataset.objects.create(name="rename-ds", kind="image_folder", root_path="/none", image_width=8,
                                     image_height=8)  # fmt: skip
    classifier = Classifier.objects.create(dataset=dataset, name="rename-clf", architecture="small_cnn",
                                           checkpoint_path="-", split_point="f", input_size=8)  # fmt: skip
    study = old.get_model("studies", "Study").objects.create(
        title="old", dataset_id=dataset.pk, classifier_id=classifier.pk
    )
    Old = old.get_model("studies", "Condition")
    Old.objects.create(study=study, method="cve", setup="semantic")
    Old.objects.create(study=study, method="semantic", setup="random")
    type(study).objects.filter(pk=study.pk).update(status="closed")  # the rename must pass the frozen guards

    executor = MigrationExecutor(connection)
    executor.migrate([AFTER])
    new = executor.loader.project_state([AFTER]).apps.get_model("studies", "Condition")
    stored = set(new.objects.filter(study_id=study.pk).values_list("method", "setup"))
    assert stored == {("cve", "consistent"), ("semantic", "random")}  # the method keeps its name

    executor = MigrationExecutor(connection)
    executor.migrate([BEFORE])
    back = executor.loader.project_state([BEFORE]).apps.get_model("studies", "Condition")
    assert set(back.objects.filter(study_id=study.pk).values_list("setup", flat=True)) == {
        "semantic",
        "random",
    }
    MigrationExecutor(connection).migrate(executor.loader.graph.leaf_nodes())


def test_old_exports_read_with_the_new_setup_name():
    old_export = io.StringIO(
        "rater,method,setup,phase,answer,correct_answer,correct\n"
        "r1,semantic,semantic,test,A,A,1\n"
        "r2,cve,random,test,B,A,0\n"
    )
    rows = tidy_read(old_export)
    assert rows["setup"].tolist() == ["consistent", "random"]
    assert rows["method"].tolist() == ["semantic", "cve"]  # methods are not renamed
    with pytest.raises(ValueError, match=r"columns \['setup'"):
        tidy_read(io.StringIO("rater,method,phase,correct\nr1,cve,test,1\n"))
