"""The design of a machine-teaching study and what raters do in it (Vandenhende et al. 2022, section 4.4)."""

import secrets
import uuid

from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db import models
from django.db.models import Q

from explain.methods import is_registered, method_names

from .preregistration import plan_problem

FROZEN_MESSAGE = (
    "Study {title!r} is {status} (version {version}): its design is frozen so that every rater sees the same "
    "study. Close it and copy it into a new study to change the design."
)


def _related_or_none(instance: models.Model, field: str) -> models.Model | None:
    """The object a foreign key points to, also when it is not saved yet (an admin inline on an add form)."""
    try:
        return getattr(instance, field)
    except ObjectDoesNotExist:
        return None


def _changed(instance: models.Model, fields: tuple[str, ...]) -> bool:
    """Whether ``instance`` is new or differs from its stored row in any of ``fields``."""
    stored = type(instance).objects.filter(pk=instance.pk).values(*fields).first() if instance.pk else None
    return stored is None or any(stored[f] != getattr(instance, f) for f in fields)


# The exclusion rules a study can declare before launch: name -> (check of the value, what it means).
EXCLUSION_RULES = {
    "failed_catch_trials": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "an integer >= 1: exclude raters who fail at least this many catch trials",
    ),
    "median_rt_below_ms": (
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0,
        "a number > 0: exclude raters whose median reaction time (ms) is below it",
    ),
    "incomplete": (
        lambda v: isinstance(v, bool),
        "true or false: exclude raters who did not complete their assignment",
    ),
}


def exclusion_rules_problem(rules: object) -> str | None:
    """Why ``rules`` is not a valid set of exclusion rules, or None when it is."""
    if not isinstance(rules, dict):
        return f"Exclusion rules must be a JSON object, not {rules!r}."
    for name, value in rules.items():
        if name not in EXCLUSION_RULES:
            return f"Unknown exclusion rule {name!r}; known rules: {', '.join(sorted(EXCLUSION_RULES))}."
        check, meaning = EXCLUSION_RULES[name]
        if not check(value):
            return f"Exclusion rule {name!r} has the value {value!r}; it must be {meaning}."
    return None


class Study(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "draft"
        PRECOMPUTING = "precomputing", "precomputing"
        READY = "ready", "ready"
        LIVE = "live", "live"
        PAUSED = "paused", "paused (takes no new raters)"
        CLOSED = "closed", "closed"

    class StimulusRegion(models.TextChoices):
        FIRST_EDIT = "first-edit", "the first edit's region (the paper's stimulus, Vandenhende et al. 2022)"
        ALL_EDITS = "all-edits", "every edit's region (not the paper's stimulus)"

    class Design(models.TextChoices):
        BETWEEN = "between", "between subjects (one condition per rater)"
        WITHIN = "within", "within subjects (a condition per class pair)"

    title = models.CharField(
        max_length=200, help_text="For researchers only; raters never see it. May change while live."
    )
    description = models.TextField(
        blank=True, help_text="Notes for researchers (aims, waves, changes); raters never see it."
    )
    status = models.CharField(
        max_length=16,
        choices=Status.choices,
        default=Status.DRAFT,
        help_text=(
            "draft -> precomputing -> ready -> live (paused) -> closed; changed by the buttons above. Live, "
            "paused and closed studies are frozen."
        ),
    )
    dataset = models.ForeignKey(
        "explain.Dataset",
        on_delete=models.PROTECT,
        related_name="studies",
        help_text="The images raters classify and the explanations are made of (Data sets in the admin).",
    )
    classifier = models.ForeignKey(
        "explain.Classifier",
        on_delete=models.PROTECT,
        related_name="studies",
        help_text=(
            "The model whose decisions the counterfactuals explain; it must be trained on the study's data "
            "set. Its confusion matrix is where class pairs are mined."
        ),
    )
    n_prelearning = models.PositiveSmallIntegerField(
        "images in pre-learning",
        default=10,
        help_text="Images a rater classifies per class pair before any explanation (their baseline).",
    )
    n_learning = models.PositiveSmallIntegerField(
        "explanations in learning",
        default=10,
        help_text="Counterfactual explanations a rater studies per class pair (each precomputed once).",
    )
    n_test = models.PositiveSmallIntegerField(
        "images in test",
        default=10,
        help_text="Images a rater classifies per class pair after learning: the outcome compared.",
    )
    label_a = models.CharField(
        "displayed label of class A",
        max_length=50,
        default="class A",
        help_text="What raters see instead of the query class's name (which they must not learn from us).",
    )
    label_b = models.CharField(
        "displayed label of class B",
        max_length=50,
        default="class B",
        help_text="What raters see instead of the distractor class's name; must differ from class A's label.",
    )
    blur_sigma = models.FloatField(
        "blur strength (Gaussian sigma, pixels)",
        default=8.0,
        help_text=(
            "How strongly everything outside the explained region is blurred in the learning stimuli "
            "(Gaussian sigma in pixels of the displayed 224 px image; 0: no blur). The preview shows one "
            "image of the data set at this blur, its centre in focus."
        ),
    )
    stimulus_region = models.CharField(
        "region a learning stimulus shows sharp",
        max_length=16,
        choices=StimulusRegion.choices,
        default=StimulusRegion.FIRST_EDIT,
        help_text="For cell methods: the first edit's cells (the paper's stimulus) or all edited cells.",
    )
    design = models.CharField(
        "assignment design",
        max_length=16,
        choices=Design.choices,
        default=Design.BETWEEN,
        help_text=(
            "Between subjects: each rater learns with one condition. Within subjects: each rater meets "
            "several conditions, one per class pair."
        ),
    )
    pairs_per_assignment = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        help_text="Class pairs each rater sees; empty means all of the study's pairs.",
    )
    min_learning_seconds = models.FloatField(
        "minimum viewing time per explanation (s)",
        default=3.0,
        help_text="A learning trial's Next button stays disabled this long, so explanations are looked at.",
    )
    time_limit_minutes = models.PositiveIntegerField(
        "time limit per assignment (min)",
        default=60,
        help_text="An assignment not finished within this time is timed out and its place offered again.",
    )
    completion_code = models.CharField(
        "completion code prefix",
        max_length=40,
        blank=True,
        help_text="Each rater gets their own code at the end: this prefix, a dash and random letters.",
    )
    prolific_completion_code = models.CharField(
        max_length=64, blank=True, help_text="Prolific's code for a completed submission (sent back as ?cc=)."
    )
    prolific_timeout_code = models.CharField(
        max_length=64,
        blank=True,
        help_text="Prolific's code for a rater who ran out of time; empty: they are only thanked.",
    )
    prolific_failed_check_code = models.CharField(
        max_length=64,
        blank=True,
        help_text=(
            "Prolific's code for a rater who failed the declared attention checks (exclusion rule "
            "failed_catch_trials); empty: the completion code."
        ),
    )
    mturk_sandbox = models.BooleanField(
        "Take MTurk sandbox workers (as pilots)",
        default=True,
        help_text=(
            "Workers arriving from MTurk's sandbox (workersandbox.mturk.com: you and colleagues trying the "
            "HIT unpaid) get pilot assignments, left out of the balance counts and the analysis. Untick it "
            "once the HIT is on the live site, and sandbox workers are turned away."
        ),
    )
    direct_link_open = models.BooleanField(
        default=True, help_text="Whether the plain study link (no Prolific or MTurk ids) takes new raters."
    )
    max_raters = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Completed plus in-progress assignments at which the study is full; empty: no limit.",
    )
    consent_text = models.TextField(
        blank=True,
        help_text="The consent form's text (blank lines separate paragraphs); empty: a default text.",
    )
    pay = models.CharField(max_length=100, blank=True, help_text='e.g. "GBP 1.50 on completion".')
    expected_minutes = models.PositiveSmallIntegerField(
        "expected duration (min)",
        null=True,
        blank=True,
        help_text="Told to raters on the consent page; empty: not stated.",
    )
    contact = models.CharField(
        "researcher contact", max_length=200, blank=True, help_text="Name and e-mail address for questions."
    )
    ethics_reference = models.CharField(
        "ethics approval reference", max_length=200, blank=True, help_text="Review board and approval number."
    )
    debrief_text = models.TextField(
        blank=True,
        help_text="Shown after the last answer (blank lines separate paragraphs); empty: a default.",
    )
    example_pair = models.ForeignKey(
        "ClassPair",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text=(
            "A pair kept for the instructions' example and the MTurk preview; it is never assigned to "
            "raters. Empty: each rater's example comes from a pair they are not assigned."
        ),
    )
    excluded_studies = models.ManyToManyField(
        "self",
        symmetrical=False,
        blank=True,
        help_text="Raters who took any of these may not take this one.",
    )
    exclusion_rules = models.JSONField(
        default=dict,
        blank=True,
        help_text=(
            'Declared before launch, e.g. {"failed_catch_trials": 1, "median_rt_below_ms": 300, '
            '"incomplete": true}: raters these rules exclude are reported and left out of the analysis.'
        ),
    )
    preregistration = models.JSONField(
        "analysis plan (pre-registration)",
        default=dict,
        blank=True,
        help_text=(
            'Chosen before launch, frozen at launch, e.g. {"contrasts": "pairwise", "headline": '
            '"ours vs cve | consistent", "alpha": 0.05}; keys left out take the defaults of '
            "studies.preregistration."
        ),
    )
    preregistered_at = models.DateTimeField(null=True, blank=True, help_text="When the plan was frozen.")
    seed = models.PositiveIntegerField(
        "random seed",
        default=0,
        help_text="Fixes the test images of each pair and every rater's orders; recorded with the data.",
    )
    catch_trials_per_pair = models.PositiveSmallIntegerField(
        "catch trials per class pair",
        default=0,
        help_text="Test trials that show a learning stimulus again, whose answer the rater was just taught.",
    )
    min_rt_ms = models.PositiveIntegerField(
        "minimum reaction time (ms)",
        default=200,
        help_text="Answers faster than this are flagged as too fast (kept, and reported).",
    )
    version = models.PositiveIntegerField(default=1, help_text="Raised on each launch; frozen while live.")
    copied_from = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="copies",
        help_text="The study this draft was copied from.",
    )
    copied_from_version = models.PositiveIntegerField(
        null=True, blank=True, help_text="The version of that study's design it was copied from."
    )
    unblinded_at = models.DateTimeField(
        null=True, blank=True, help_text="When a researcher looked at accuracy by condition before closing."
    )
    unblinded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    launched_at = models.DateTimeField(null=True, blank=True, help_text="When the study last went live.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "studies"
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(n_prelearning__gte=1, n_learning__gte=1, n_test__gte=1),
                name="study_phases_not_empty",
            ),
            models.CheckConstraint(condition=~Q(label_a=models.F("label_b")), name="study_labels_differ"),
            models.CheckConstraint(condition=Q(blur_sigma__gte=0), name="study_blur_nonnegative"),
            models.CheckConstraint(
                condition=Q(pairs_per_assignment__isnull=True) | Q(pairs_per_assignment__gte=1),
                name="study_pairs_per_assignment_positive",
            ),
        ]

    def __str__(self) -> str:
        return self.title

    # What raters experience; frozen while the study is live or closed.
    DESIGN_FIELDS = (
        "dataset_id", "classifier_id", "n_prelearning", "n_learning", "n_test", "label_a", "label_b",
        "blur_sigma", "stimulus_region", "design", "pairs_per_assignment", "min_learning_seconds",
        "time_limit_minutes", "seed", "exclusion_rules", "catch_trials_per_pair", "min_rt_ms",
        "example_pair_id", "preregistration",
    )  # fmt: skip

    FROZEN_STATUSES = frozenset({"live", "paused", "closed"})

    # The fields a researcher may still edit once the study is frozen: its name and notes and the recruitment
    # settings raters never see as part of the design (a subset of migration 0005's MUTABLE_COLUMNS, which the
    # database enforces). Every other field is read-only on a frozen study's page.
    EDITABLE_WHEN_FROZEN = frozenset(
        {
            "title", "description", "completion_code", "prolific_completion_code", "mturk_sandbox",
            "direct_link_open", "max_raters", "prolific_failed_check_code", "prolific_timeout_code",
            "consent_text", "pay", "expected_minutes", "contact", "ethics_reference", "debrief_text",
        }
    )  # fmt: skip

    @property
    def is_frozen(self) -> bool:
        """A live, paused or closed study's design, trials and responses can no longer change (the database
        refuses too: migration 0005's triggers)."""
        return self.status in self.FROZEN_STATUSES

    @property
    def accuracy_visible(self) -> bool:
        """Accuracy by condition is blinded while raters are still arriving, unless a researcher unblinded."""
        return self.status == self.Status.CLOSED or self.unblinded_at is not None

    def frozen_message(self) -> str:
        return FROZEN_MESSAGE.format(title=self.title, status=self.status, version=self.version)

    def clean(self) -> None:
        errors: dict[str, str] = {}
        for field in ("n_prelearning", "n_learning", "n_test"):
            value = getattr(self, field)
            if value is not None and value < 1:
                label = self._meta.get_field(field).verbose_name
                errors[field] = (
                    f"Each phase needs at least one item; {label} is {value}. Use 1 or more (default 10)."
                )
        if self.dataset_id and self.classifier_id and self.classifier.dataset_id != self.dataset_id:
            errors["classifier"] = (
                f"Classifier {self.classifier.name!r} was trained on data set "
                f"{self.classifier.dataset.name!r}, but this study uses {self.dataset.name!r}. "
                f"Pick a classifier trained on {self.dataset.name!r}."
            )
        if self.label_a and self.label_a == self.label_b:
            errors["label_b"] = (
                f"Both classes would be shown as {self.label_a!r}; give class B another label."
            )
        if self.example_pair_id and self.example_pair.study_id != self.pk:
            errors["example_pair"] = (
                f"Pair {self.example_pair} belongs to study {self.example_pair.study_id}; choose one of this "
                "study's pairs as its example pair."
            )
        rules_error = exclusion_rules_problem(self.exclusion_rules)
        if rules_error:
            errors["exclusion_rules"] = rules_error
        plan_error = plan_problem(self.preregistration)
        if plan_error:
            errors["preregistration"] = plan_error
        if self.pk:
            stored = Study.objects.filter(pk=self.pk).first()
            if stored is not None and stored.is_frozen:
                changed = [f for f in self.DESIGN_FIELDS if getattr(stored, f) != getattr(self, f)]
                if changed:
                    names = ", ".join(f.removesuffix("_id") for f in changed)
                    raise ValidationError(f"{stored.frozen_message()} Refused change to: {names}.")
        if errors:
            raise ValidationError(errors)


class ClassPair(models.Model):
    class Mining(models.TextChoices):
        MOST_CONFUSED = "most_confused", "most-confused class per class"
        TOP_K = "top_k", "top-k confused pairs"
        ATTRIBUTES = "attributes", "nearest class by attributes"
        MANUAL = "manual", "chosen by hand"

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="pairs")
    class_a = models.ForeignKey(
        "explain.ClassLabel",
        on_delete=models.PROTECT,
        related_name="+",
        help_text="Query class.",
    )
    class_b = models.ForeignKey(
        "explain.ClassLabel",
        on_delete=models.PROTECT,
        related_name="+",
        help_text="Distractor class.",
    )
    mined_by = models.CharField(max_length=32, choices=Mining.choices, default=Mining.MANUAL)
    confusion_score = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["study", "id"]
        constraints = [
            models.UniqueConstraint(fields=["study", "class_a", "class_b"], name="pair_unique_per_study"),
            models.CheckConstraint(condition=~Q(class_a=models.F("class_b")), name="pair_classes_differ"),
        ]

    def __str__(self) -> str:
        return f"{self.class_a.name} vs {self.class_b.name}"

    def clean(self) -> None:
        study = _related_or_none(self, "study")
        if study is None or not (self.class_a_id and self.class_b_id):
            return
        if study.is_frozen and _changed(self, ("class_a_id", "class_b_id")):
            raise ValidationError(study.frozen_message())
        if self.class_a_id == self.class_b_id:
            raise ValidationError(
                {"class_b": f"A pair needs two different classes; both are {self.class_a.name!r}."}
            )
        for field in ("class_a", "class_b"):
            label = getattr(self, field)
            if study.dataset_id and label.dataset_id != study.dataset_id:
                raise ValidationError(
                    {
                        field: f"Class {label.name!r} belongs to data set {label.dataset.name!r}, not to the "
                        f"study's data set {study.dataset.name!r}."
                    }
                )


class Condition(models.Model):
    class Setup(models.TextChoices):
        RANDOM = "random", "random image pairs"
        # "consistent", not "semantic": a method is called semantic (Vandenhende et al. 2022), and labels like
        # "(semantic vs scout) x (semantic vs random)" must not be ambiguous.
        CONSISTENT = "consistent", "semantically consistent image pairs"

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="conditions")
    method = models.CharField(max_length=64, help_text="A registered counterfactual method.")
    setup = models.CharField("pair-selection setup", max_length=16, choices=Setup.choices)

    class Meta:
        ordering = ["study", "method", "setup"]
        constraints = [
            models.UniqueConstraint(fields=["study", "method", "setup"], name="condition_unique_per_study"),
        ]

    def __str__(self) -> str:
        return f"{self.method} / {self.setup}"

    def clean(self) -> None:
        study = _related_or_none(self, "study")
        if study is not None and study.is_frozen and _changed(self, ("method", "setup")):
            raise ValidationError(study.frozen_message())
        if self.method and not is_registered(self.method):
            raise ValidationError(
                {
                    "method": f"No counterfactual method is registered as {self.method!r}. "
                    f"Registered methods: {', '.join(method_names())}."
                }
            )


class ConsentText(models.Model):
    """One version of a study's consent form, as raters saw it; each assignment records the one agreed to."""

    study = models.ForeignKey(Study, on_delete=models.PROTECT, related_name="consent_texts")
    text = models.TextField()
    digest = models.CharField(max_length=64, help_text="SHA-256 of the text.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["study", "created_at"]
        constraints = [
            models.UniqueConstraint(fields=["study", "digest"], name="consent_text_unique_per_study"),
        ]

    def __str__(self) -> str:
        return f"consent {self.digest[:12]} of study {self.study_id}"


def new_rater_token() -> str:
    """An unguessable token (192 random bits) that carries a rater's place in their URLs."""
    return secrets.token_urlsafe(24)


class Rater(models.Model):
    """A person (or a simulated learner) known only by an opaque id; provider ids live in ProviderIdentity."""

    opaque_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    is_simulated = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return str(self.opaque_id)


class ProviderIdentity(models.Model):
    class Provider(models.TextChoices):
        DIRECT = "direct", "direct link"
        MTURK = "mturk", "Amazon Mechanical Turk"
        PROLIFIC = "prolific", "Prolific"

    rater = models.ForeignKey(Rater, on_delete=models.CASCADE, related_name="identities")
    provider = models.CharField(max_length=16, choices=Provider.choices)
    external_id = models.CharField(
        max_length=200, help_text="Worker id, Prolific PID or a direct-link token."
    )
    extra = models.JSONField(default=dict, blank=True, help_text="HIT / assignment / session ids.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "provider identities"
        constraints = [
            models.UniqueConstraint(fields=["provider", "external_id"], name="identity_unique_per_provider"),
        ]

    def __str__(self) -> str:
        return f"{self.provider} identity of rater {self.rater_id}"


class Assignment(models.Model):
    class Status(models.TextChoices):
        STARTED = "started", "started"
        COMPLETED = "completed", "completed"
        RETURNED = "returned", "returned"
        TIMED_OUT = "timed_out", "timed out"
        EXCLUDED = "excluded", "excluded"

    rater = models.ForeignKey(Rater, on_delete=models.PROTECT, related_name="assignments")
    study = models.ForeignKey(Study, on_delete=models.PROTECT, related_name="assignments")
    study_version = models.PositiveIntegerField()
    provider = models.CharField(max_length=16, choices=ProviderIdentity.Provider.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.STARTED)
    seed = models.BigIntegerField(
        help_text="Seeds image order and the left/right order of the answer buttons."
    )
    token = models.CharField(
        max_length=64,
        unique=True,
        default=new_rater_token,
        editable=False,
        help_text="The rater's place in their URLs: works without cookies (MTurk's cross-site frame).",
    )
    completion_code = models.CharField(max_length=64, blank=True, help_text="The rater's own code.")
    is_pilot = models.BooleanField(
        default=False,
        help_text="A researcher trying the study as a rater; left out of balance counts and of the analysis.",
    )
    exclusion_reason = models.CharField(max_length=200, blank=True)
    consented_at = models.DateTimeField(null=True, blank=True)
    consent = models.ForeignKey(
        ConsentText,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="assignments",
        help_text="The consent text the rater agreed to.",
    )
    instructed_at = models.DateTimeField(null=True, blank=True)
    example_explanation = models.ForeignKey(
        "explain.Explanation",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The stimulus the instructions explain.",
    )
    started_at = models.DateTimeField(auto_now_add=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["study", "status", "started_at"], name="assignment_study_status")]
        constraints = [
            models.UniqueConstraint(fields=["rater", "study"], name="assignment_one_per_rater_and_study"),
            models.UniqueConstraint(
                fields=["completion_code"], condition=~Q(completion_code=""), name="assignment_code_unique"
            ),
            models.CheckConstraint(
                condition=Q(status="completed", completed_at__isnull=False) | ~Q(status="completed"),
                name="assignment_completed_has_time",
            ),
        ]

    def __str__(self) -> str:
        return f"assignment {self.pk} of {self.rater} in {self.study}"


class Block(models.Model):
    """One class pair taught with one condition, in the order the rater meets them."""

    assignment = models.ForeignKey(Assignment, on_delete=models.CASCADE, related_name="blocks")
    position = models.PositiveSmallIntegerField()
    pair = models.ForeignKey(ClassPair, on_delete=models.PROTECT, related_name="+")
    condition = models.ForeignKey(Condition, on_delete=models.PROTECT, related_name="+")
    a_on_left = models.BooleanField(default=True, help_text="Whether the class A button is on the left.")

    class Meta:
        ordering = ["assignment", "position"]
        constraints = [
            models.UniqueConstraint(fields=["assignment", "position"], name="block_unique_position"),
        ]

    def __str__(self) -> str:
        return f"block {self.position} of assignment {self.assignment_id}"


class Phase(models.TextChoices):
    PRE_LEARNING = "pre", "pre-learning"
    LEARNING = "learning", "learning"
    TEST = "test", "test"


class Answer(models.TextChoices):
    A = "A", "class A"
    B = "B", "class B"
    DONT_KNOW = "D", "don't know"
    SEEN = "seen", "seen (learning)"


class Trial(models.Model):
    block = models.ForeignKey(Block, on_delete=models.CASCADE, related_name="trials")
    key = models.UUIDField(
        default=uuid.uuid4,
        unique=True,
        editable=False,
        help_text="The opaque id in the rater's URLs; says nothing about the trial.",
    )
    phase = models.CharField(max_length=16, choices=Phase.choices)
    position = models.PositiveSmallIntegerField()
    image = models.ForeignKey(
        "explain.Image",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
    )
    explanation = models.ForeignKey(
        "explain.Explanation",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
    )
    correct_answer = models.CharField(
        max_length=1, blank=True, help_text="A or B; empty for learning trials."
    )
    is_catch = models.BooleanField(default=False)
    shown_at = models.DateTimeField(
        null=True, blank=True, help_text="When the rater's browser was first sent it."
    )

    class Meta:
        ordering = ["block", "id"]
        constraints = [
            models.UniqueConstraint(fields=["block", "phase", "position"], name="trial_unique_position"),
            models.CheckConstraint(condition=Q(phase__in=Phase.values), name="trial_phase_allowed"),
            models.CheckConstraint(
                condition=(
                    Q(
                        phase=Phase.LEARNING,
                        explanation__isnull=False,
                        correct_answer="",
                    )
                    | Q(
                        phase__in=[Phase.PRE_LEARNING, Phase.TEST],
                        image__isnull=False,
                        correct_answer__in=["A", "B"],
                    )
                ),
                name="trial_shows_what_its_phase_needs",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.phase} trial {self.position} of block {self.block_id}"


class Response(models.Model):
    """A rater's answer to one trial; the database keeps at most one per trial."""

    trial = models.OneToOneField(Trial, on_delete=models.CASCADE, related_name="response")
    phase = models.CharField(max_length=16, choices=Phase.choices, help_text="Copied from the trial.")
    answer = models.CharField(max_length=4, choices=Answer.choices)
    client_rt_ms = models.PositiveIntegerField(
        "reaction time measured in the browser (ms)", null=True, blank=True
    )
    server_rt_ms = models.PositiveIntegerField(
        "reaction time measured on the server (ms)", null=True, blank=True
    )
    client_sent_at = models.DateTimeField(null=True, blank=True)
    too_fast = models.BooleanField(default=False, help_text="Faster than the study's minimum reaction time.")
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["received_at"]
        constraints = [
            models.CheckConstraint(
                condition=(
                    Q(phase=Phase.PRE_LEARNING, answer__in=["A", "B", "D"])
                    | Q(phase=Phase.LEARNING, answer="seen")
                    | Q(phase=Phase.TEST, answer__in=["A", "B"])
                ),
                name="response_answer_allowed_in_phase",
            ),
        ]

    def __str__(self) -> str:
        return f"response {self.answer!r} to trial {self.trial_id}"


class RaterEvent(models.Model):
    """Something the rater's browser reported while they worked: the page lost or regained focus."""

    class Kind(models.TextChoices):
        FOCUS = "focus", "window focused"
        BLUR = "blur", "window lost focus"
        HIDDEN = "hidden", "page hidden"
        VISIBLE = "visible", "page visible"

    assignment = models.ForeignKey(Assignment, on_delete=models.CASCADE, related_name="events")
    trial = models.ForeignKey(Trial, on_delete=models.CASCADE, null=True, blank=True, related_name="events")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    client_ms = models.BigIntegerField(null=True, blank=True, help_text="Browser clock, ms since page load.")
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["assignment", "at"]

    def __str__(self) -> str:
        return f"{self.kind} in assignment {self.assignment_id}"


class Correction(models.Model):
    """An annotation on a frozen study's data: who, when, why, and what the analysis should read instead.

    The data stay as collected (the database refuses changes); the analysis applies corrections on top and the
    report lists them. Corrections are append-only: a mistaken one is withdrawn by a later one.
    """

    class Kind(models.TextChoices):
        ANSWER_KEY = "answer_key", "the trial's correct answer was wrong"
        DROP_RESPONSE = "drop_response", "leave this response out of the analysis"
        DROP_ASSIGNMENT = "drop_assignment", "leave this rater's assignment out of the analysis"
        WITHDRAW = "withdraw", "withdraw an earlier correction"

    study = models.ForeignKey(Study, on_delete=models.PROTECT, related_name="corrections")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    trial = models.ForeignKey(Trial, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    assignment = models.ForeignKey(
        Assignment, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    withdrawn = models.OneToOneField(
        "self", on_delete=models.PROTECT, null=True, blank=True, related_name="withdrawn_by"
    )
    corrected_answer = models.CharField(
        max_length=1, blank=True, help_text="For an answer-key correction: A or B."
    )
    reason = models.TextField(help_text="Why; shown in the report beside the correction.")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["study", "created_at", "id"]
        constraints = [
            models.CheckConstraint(
                condition=(
                    Q(kind="answer_key", trial__isnull=False, corrected_answer__in=["A", "B"])
                    | Q(kind="drop_response", trial__isnull=False, corrected_answer="")
                    | Q(kind="drop_assignment", assignment__isnull=False, corrected_answer="")
                    | Q(kind="withdraw", withdrawn__isnull=False, corrected_answer="")
                ),
                name="correction_names_what_it_corrects",
            ),
            models.CheckConstraint(condition=~Q(reason=""), name="correction_has_a_reason"),
        ]

    def __str__(self) -> str:
        return f"correction {self.pk} ({self.kind}) of study {self.study_id}"


class AuditEntry(models.Model):
    """One change a researcher made to a study, its conditions, pairs, exclusions or launch state.

    Append-only (the database refuses updates and deletes); shown on the study page, exported with the data.
    """

    study = models.ForeignKey(Study, on_delete=models.PROTECT, related_name="audit_entries")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    action = models.CharField(max_length=64, help_text="e.g. changed, launched, condition added.")
    detail = models.JSONField(default=dict, blank=True, help_text="What changed: field -> [before, after].")
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["study", "at", "id"]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.action} on study {self.study_id} at {self.at:%Y-%m-%d %H:%M}"
