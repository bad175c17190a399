"""The analysis plan: chosen on the study with defaults, validated with errors that name the value, frozen at
the first launch with the exclusion rules, and every later departure named."""

import pytest
from django.core.exceptions import ValidationError

from studies import services
from studies.preregistration import PLAN_DEFAULTS, plan_deviations, plan_problem, plan_resolve
from tests.studies.test_services import ready_study


def test_defaults_fill_what_the_researcher_left_out():
    plan = plan_resolve({"contrasts": "pairwise", "alpha": 0.01}, exclusion_rules={"incomplete": True})
    assert plan["contrasts"] == "pairwise" and plan["alpha"] == 0.01
    assert plan["correction"] == PLAN_DEFAULTS["correction"] == "holm"
    assert plan["exclusion_rules"] == {"incomplete": True} and plan["frozen_at"] is None


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"correction": "fdr"}, "'correction' is 'fdr'; choose one of holm, bonferroni, none"),
        ({"alpha": 0.7}, "'alpha' is 0.7"),
        ({"permutations": 10}, "'permutations' is 10"),
        ({"speed": 1}, "Unknown pre-registration key 'speed'"),
        ("holm", "must be a JSON object"),
    ],
)
def test_a_bad_plan_is_refused_with_the_value(plan, message):
    assert message in plan_problem(plan)
    if isinstance(plan, dict):
        with pytest.raises(ValueError) as info:
            plan_resolve(plan, exclusion_rules={})
        assert message in str(info.value)


def test_deviations_are_named_and_an_unfrozen_plan_is_one():
    frozen = plan_resolve({}, exclusion_rules={"incomplete": True}, frozen_at="2026-12-01T00:00:00+00:00")
    assert plan_deviations(frozen, dict(frozen)) == []
    changed = dict(frozen, exclusion_rules={}, alpha=0.1)
    assert plan_deviations(frozen, changed) == [
        "alpha: pre-registered 0.05, analysed with 0.1",
        "exclusion_rules: pre-registered {'incomplete': True}, analysed with {}",
    ]
    assert "no pre-registration was frozen" in plan_deviations(dict(frozen, frozen_at=None), frozen)[0]


@pytest.mark.django_db
def test_launch_freezes_the_plan_and_the_frozen_plan_cannot_change():
    study = ready_study()
    study.preregistration = {"headline": "cve vs scout | random"}
    study.exclusion_rules = {"failed_catch_trials": 2}
    study.save()
    study = services.study_launch(study=study)
    assert study.preregistered_at == study.launched_at
    assert study.preregistration["headline"] == "cve vs scout | random"
    assert study.preregistration["exclusion_rules"] == {"failed_catch_trials": 2}
    assert study.preregistration["frozen_at"] == study.launched_at.isoformat()
    with pytest.raises(ValidationError, match="frozen"):
        services.study_update(study=study, preregistration={"alpha": 0.1})
    services.study_close(study=study)
    relaunched = services.study_launch(study=study)
    assert relaunched.preregistered_at == study.preregistered_at  # frozen once, at the first launch
