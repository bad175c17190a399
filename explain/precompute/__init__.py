"""Precompute a study's learning stimuli on Celery workers: a stored plan of units with deterministic keys.

The one place that knows both a Study and torch. ``study_precompute`` (``planning``) plans the work: the
models each method's declaration needs (trained once per data set and reused across studies, once per
classifier, or once per class pair), a seeded stream of candidate image pairs per class pair, and one unit per
(class pair, condition = method or variant x setup, candidate image pair). Units go to the ``explain`` queue
(``units``); a worker runs ``work_unit_run`` (``running``), which builds the method and explains the pair in
``worker`` (models loaded once per process; the only module here that imports torch, and only on a worker).
``advancing`` releases waiting units, keeps the semantic setup's best candidates and marks the study ready;
``selectors`` reads progress and the gallery; ``views`` are the researcher's pages.

Safe to repeat and to kill:
- every unit has a deterministic key (unique in the database), so planning twice creates nothing twice;
- a unit's result (the Explanation, whose key is the unit's key, and the unit's status) is written in one
  transaction, and the broker acknowledges the task only after it returns (``CELERY_TASK_ACKS_LATE``), so a
  worker killed mid-task leaves the unit "running"; the broker hands the task to another worker after its
  visibility timeout and the unit runs again. A unit started ``MAX_ATTEMPTS`` times without finishing is
  failed with a message, so a unit that kills its worker (out of memory) cannot loop forever.

An image pair that cannot be explained (the classifier gets the query or distractor wrong, or no edit flips
the decision) is replaced by the next candidate of its class pair; the study reports how often, per method.
The "random" setup explains the first ``n_learning`` candidates (the same image pairs for every method); the
"consistent" setup explains ``semantic_pool`` times as many and keeps, per method, those whose first edit
scores best (Same-KP, or a proxy without keypoints). When every condition of every pair has its stimuli the
study goes from precomputing to ready.
"""

from explain.precompute.advancing import plan_advance, plan_retry_failed, work_unit_retry
from explain.precompute.planning import candidate_stream, study_precompute
from explain.precompute.running import work_unit_run, work_units_run
from explain.precompute.selectors import condition_gallery, plan_progress, training_summary
from explain.precompute.units import MAX_ATTEMPTS, method_backbones, unit_seed

__all__ = [
    "MAX_ATTEMPTS",
    "candidate_stream",
    "condition_gallery",
    "method_backbones",
    "plan_advance",
    "plan_progress",
    "plan_retry_failed",
    "study_precompute",
    "training_summary",
    "unit_seed",
    "work_unit_retry",
    "work_unit_run",
    "work_units_run",
]
