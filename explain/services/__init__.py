"""Writes of the explain app, by subject: background jobs (``jobs``, the job kinds in ``job_kinds``), data
sets (``datasets``), classifiers (``classifiers``), the auxiliary embedding (``auxiliary``) and the generative
backbones (``backbones``; a researcher's own registered by ``registration``) and the embedded default's
shipped models (``shipped``). The names below are the public surface other apps use."""

from explain.services.auxiliary import auxiliary_check, auxiliary_register, auxiliary_train
from explain.services.classifiers import classifier_evaluate, classifier_register, classifier_train
from explain.services.datasets import DEFAULT_DATASET_NAMES, dataset_import
from explain.services.jobs import job_create, job_execute, job_progress
from explain.services.registration import backbone_register
from explain.services.shipped import shipped_bridge_register, shipped_models_prepare

__all__ = [
    "DEFAULT_DATASET_NAMES",
    "auxiliary_check",
    "auxiliary_register",
    "auxiliary_train",
    "backbone_register",
    "classifier_evaluate",
    "classifier_register",
    "classifier_train",
    "dataset_import",
    "job_create",
    "job_execute",
    "job_progress",
    "shipped_bridge_register",
    "shipped_models_prepare",
]
