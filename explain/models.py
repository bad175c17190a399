"""Data sets, classifiers, auxiliary and generative backbones, precomputed explanations, background jobs."""

from django.db import models
from django.db.models import F, Q

from .imaging import MetadataFreeImageField


class Dataset(models.Model):
    class Kind(models.TextChoices):
        FASHION_MNIST = "fashion-mnist", "Fashion-MNIST"
        CUB_200_2011 = "cub-200-2011", "CUB-200-2011"
        IMAGE_FOLDER = "image-folder", "Image folder"

    name = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    root_path = models.CharField(max_length=1000, help_text="Where the data set was imported from.")
    image_width = models.PositiveIntegerField(
        null=True, blank=True, help_text="Native width; empty if it varies."
    )
    image_height = models.PositiveIntegerField(
        null=True, blank=True, help_text="Native height; empty if it varies."
    )
    summary = models.JSONField(
        default=dict, blank=True, help_text="Counts per split and class, from a check."
    )
    attribute_names = models.JSONField(
        default=list, blank=True, help_text="Names of the per-image attribute vector's entries (CUB)."
    )
    import_report = models.JSONField(
        default=dict, blank=True, help_text="The last import: images added, skipped files and why."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ClassLabel(models.Model):
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="classes")
    index = models.PositiveIntegerField(help_text="The classifier's output index for this class.")
    name = models.CharField(max_length=200, help_text="The true class name; never shown to raters.")

    class Meta:
        ordering = ["dataset", "index"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "index"], name="classlabel_unique_index"),
            models.UniqueConstraint(fields=["dataset", "name"], name="classlabel_unique_name"),
        ]

    def __str__(self) -> str:
        return f"{self.index}: {self.name}"


class Image(models.Model):
    class Split(models.TextChoices):
        TRAIN = "train", "train"
        TEST = "test", "test"

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="images")
    class_label = models.ForeignKey(ClassLabel, on_delete=models.PROTECT, related_name="images")
    source_id = models.CharField(max_length=200, help_text="The image's id in the source data set.")
    file = MetadataFreeImageField(upload_to="images/", max_length=500)
    split = models.CharField(max_length=8, choices=Split.choices)
    keypoints = models.JSONField(null=True, blank=True, help_text='{"part name": [x, y], ...} in pixels.')
    attributes = models.JSONField(null=True, blank=True)
    bbox = models.JSONField(
        null=True, blank=True, help_text="[x, y, width, height] of the object, in pixels."
    )

    class Meta:
        ordering = ["dataset", "split", "id"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "source_id"], name="image_unique_source_id"),
        ]
        indexes = [models.Index(fields=["dataset", "split", "class_label"])]

    def __str__(self) -> str:
        return f"{self.dataset} #{self.source_id}"


class Classifier(models.Model):
    class Architecture(models.TextChoices):
        SMALL_CNN = "small_cnn", "Built-in small CNN (7 x 7 grid)"
        VGG16 = "vgg16", "VGG-16"
        VGG16_BN = "vgg16_bn", "VGG-16 with batch norm"
        RESNET18 = "resnet18", "ResNet-18"
        RESNET50 = "resnet50", "ResNet-50"

    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="classifiers")
    name = models.CharField(max_length=200, unique=True)
    architecture = models.CharField(max_length=32, choices=Architecture.choices)
    checkpoint_path = models.CharField(max_length=1000)
    checkpoint_prefix = models.CharField(
        max_length=100,
        blank=True,
        help_text="Key prefix stripped from a Lightning checkpoint, e.g. 'model.'.",
    )
    in_channels = models.PositiveSmallIntegerField(default=3, help_text="1 for grey images, 3 for RGB.")
    options = models.JSONField(
        default=dict, blank=True, help_text='Constructor options of the architecture, e.g. {"width": 32}.'
    )
    split_point = models.CharField(
        max_length=100,
        help_text="Where the network splits into features f and decision g, e.g. 'layer4.0'.",
    )
    input_size = models.PositiveIntegerField(help_text="Side length of the square input, in pixels.")
    normalisation = models.JSONField(default=dict, blank=True, help_text='{"mean": [...], "std": [...]}')
    test_accuracy = models.FloatField(null=True, blank=True)
    confusion_matrix = models.JSONField(
        null=True, blank=True, help_text="Rows: true class; columns: predicted."
    )
    evaluation = models.JSONField(
        default=dict,
        blank=True,
        help_text='Per split: {"train": {"accuracy": ..., "confusion_matrix": [[...]], "images": n}, ...}.',
    )
    provenance = models.JSONField(
        default=dict, blank=True, help_text="How it was trained: data, epochs, seed, loss curve, time."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(test_accuracy__isnull=True) | Q(test_accuracy__gte=0, test_accuracy__lte=1),
                name="classifier_accuracy_in_unit_interval",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Prediction(models.Model):
    """A classifier's decision on one image, from evaluation; studies show only correctly classified ones."""

    classifier = models.ForeignKey(Classifier, on_delete=models.CASCADE, related_name="predictions")
    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="predictions")
    predicted_index = models.PositiveIntegerField()
    correct = models.BooleanField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["classifier", "image"], name="prediction_unique_per_image"),
        ]
        indexes = [models.Index(fields=["classifier", "correct"])]

    def __str__(self) -> str:
        return f"{self.classifier} on image {self.image_id}: {self.predicted_index}"


class Backbone(models.Model):
    """An auxiliary or generative model, trained by the platform or loaded from a local directory."""

    class Kind(models.TextChoices):
        AUXILIARY = "auxiliary", "Auxiliary embedding (self-supervised)"
        AUTOENCODER = "autoencoder", "Autoencoder (AutoencoderKL)"
        DENOISER = "denoiser", "Class-conditional latent denoiser"
        TEXT_DENOISER = "text_denoiser", "Text-to-image pipeline (Stable Diffusion)"
        BRIDGE = "bridge", "Image-to-image bridge (inpainting)"
        SAE = "sae", "Sparse autoencoder on classifier features"
        DISCRIMINATOR = "discriminator", "Discriminator"
        C3LT_MAPS = "c3lt_maps", "C3LT latent maps for one class pair"
        GENERATOR = "generator", "GAN generator and encoder"

    dataset = models.ForeignKey(
        Dataset,
        on_delete=models.PROTECT,
        related_name="backbones",
        null=True,
        blank=True,
    )
    kind = models.CharField(max_length=32, choices=Kind.choices)
    name = models.CharField(max_length=200, unique=True)
    path = models.CharField(max_length=1000, help_text="A local directory or file; never a hub id.")
    config = models.JSONField(default=dict, blank=True)
    provenance = models.JSONField(
        default=dict,
        blank=True,
        help_text="Training data, steps, loss curve, code version.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["kind", "name"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.name}"


class Explanation(models.Model):
    """One precomputed counterfactual and the learning stimulus rendered from it."""

    study = models.ForeignKey("studies.Study", on_delete=models.CASCADE, related_name="explanations")
    pair = models.ForeignKey("studies.ClassPair", on_delete=models.CASCADE, related_name="explanations")
    condition = models.ForeignKey("studies.Condition", on_delete=models.CASCADE, related_name="explanations")
    key = models.CharField(max_length=128, unique=True, help_text="Deterministic key of the unit of work.")
    query_image = models.ForeignKey(Image, on_delete=models.PROTECT, related_name="+")
    distractor_images = models.ManyToManyField(Image, through="ExplanationDistractor", related_name="+")
    flipped = models.BooleanField(help_text="Whether the edits flipped the decision to class B.")
    masks = models.FileField(upload_to="masks/", max_length=500, help_text="Region masks (.npz).")
    query_stimulus = MetadataFreeImageField(upload_to="stimuli/", max_length=500)
    distractor_stimulus = MetadataFreeImageField(upload_to="stimuli/", max_length=500)
    counterfactual_image = models.FileField(upload_to="counterfactuals/", max_length=500, blank=True)
    edits = models.JSONField(default=list, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    config = models.JSONField(
        help_text="Full generation config: method, hyperparameters, code version, seed, device."
    )
    timings = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["study", "pair", "condition", "id"]

    def __str__(self) -> str:
        return f"explanation {self.pk} ({self.condition})"


class ExplanationDistractor(models.Model):
    explanation = models.ForeignKey(Explanation, on_delete=models.CASCADE, related_name="distractor_links")
    image = models.ForeignKey(Image, on_delete=models.PROTECT, related_name="+")
    rank = models.PositiveIntegerField()

    class Meta:
        ordering = ["explanation", "rank"]
        constraints = [
            models.UniqueConstraint(fields=["explanation", "rank"], name="distractor_unique_rank"),
            models.UniqueConstraint(fields=["explanation", "image"], name="distractor_unique_image"),
        ]

    def __str__(self) -> str:
        return f"distractor {self.rank} of explanation {self.explanation_id}"


class Job(models.Model):
    """A long-running piece of work done by a Celery worker, with progress the admin can show."""

    class Status(models.TextChoices):
        QUEUED = "queued", "queued"
        RUNNING = "running", "running"
        DONE = "done", "done"
        FAILED = "failed", "failed"

    kind = models.CharField(max_length=64)
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    done = models.PositiveIntegerField(default=0)
    total = models.PositiveIntegerField(default=0)
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    worker = models.CharField(max_length=200, blank=True, help_text="Host name and device of the worker.")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(done__lte=F("total")), name="job_done_at_most_total"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} #{self.pk} ({self.status})"


class PrecomputePlan(models.Model):
    """The stored plan of a study's precompute: what must exist, so progress is "done / total" per condition.

    One plan per study; planning again extends it and creates nothing twice (each unit has a deterministic
    key).
    """

    study = models.OneToOneField("studies.Study", on_delete=models.CASCADE, related_name="precompute_plan")
    queue = models.CharField(max_length=100, default="explain", help_text="The Celery queue of its units.")
    method_config = models.JSONField(
        default=dict,
        blank=True,
        help_text='Constructor arguments per method, e.g. {"cve": {"max_edits": 5}}.',
    )
    candidates = models.JSONField(
        default=dict,
        blank=True,
        help_text="Per class pair id, the seeded stream of candidate [query image id, distractor image id].",
    )
    semantic_pool = models.PositiveSmallIntegerField(
        default=3,
        help_text="The semantic setup explains this many candidates per learning pair and keeps the best.",
    )
    quality_override = models.JSONField(
        default=dict,
        blank=True,
        help_text='{"reason": "..."}: run on backbones that fail their quality card (the report shows it).',
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"precompute plan of study {self.study_id}"


class WorkUnit(models.Model):
    """A unit of precompute work with a deterministic key: a model to train, or one image pair to explain."""

    class Kind(models.TextChoices):
        BACKBONE = "backbone", "train a backbone (once per data set)"
        PAIR_MODEL = "pair_model", "train a per-class-pair model (e.g. C3LT maps)"
        EXPLANATION = "explanation", "explain one image pair"

    class Status(models.TextChoices):
        PENDING = "pending", "pending (waits for a model)"
        QUEUED = "queued", "queued"
        RUNNING = "running", "running"
        DONE = "done", "done"
        UNEXPLAINABLE = "unexplainable", "unexplainable (replaced by another candidate)"
        DISCARDED = "discarded", "explained, not selected"
        FAILED = "failed", "failed"

    TERMINAL = (Status.DONE, Status.UNEXPLAINABLE, Status.DISCARDED, Status.FAILED)

    key = models.CharField(max_length=200, unique=True, help_text="Deterministic: planning twice finds it.")
    queue = models.CharField(max_length=100, default="explain")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    # Backbones belong to a data set (and are reused by every study on it); explanations to a plan.
    plan = models.ForeignKey(
        PrecomputePlan, on_delete=models.CASCADE, related_name="units", null=True, blank=True
    )
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="+")
    backbone_kind = models.CharField(max_length=32, choices=Backbone.Kind.choices, blank=True)
    pair = models.ForeignKey(
        "studies.ClassPair", on_delete=models.CASCADE, related_name="+", null=True, blank=True
    )
    condition = models.ForeignKey(
        "studies.Condition", on_delete=models.CASCADE, related_name="+", null=True, blank=True
    )
    candidate = models.PositiveIntegerField(
        null=True, blank=True, help_text="Index in the pair's candidate stream."
    )
    query_image = models.ForeignKey(Image, on_delete=models.PROTECT, related_name="+", null=True, blank=True)
    distractor_image = models.ForeignKey(
        Image, on_delete=models.PROTECT, related_name="+", null=True, blank=True
    )
    params = models.JSONField(default=dict, blank=True, help_text="Training options of a model unit.")
    needs = models.JSONField(default=list, blank=True, help_text="Keys of the units that must be done first.")
    replaced_by = models.ForeignKey(
        "self", on_delete=models.SET_NULL, related_name="replaces", null=True, blank=True
    )
    explanation = models.ForeignKey(
        Explanation, on_delete=models.SET_NULL, related_name="+", null=True, blank=True
    )
    backbone = models.ForeignKey(Backbone, on_delete=models.SET_NULL, related_name="+", null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True)
    outcome = models.JSONField(default=dict, blank=True, help_text="Why unexplainable, selection score, ...")
    device = models.CharField(max_length=64, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    timings = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["plan", "condition", "status"]),
            models.Index(fields=["status", "finished_at"]),
        ]
        constraints = [
            models.CheckConstraint(
                condition=~Q(kind="explanation")
                | Q(
                    plan__isnull=False,
                    pair__isnull=False,
                    condition__isnull=False,
                    candidate__isnull=False,
                    query_image__isnull=False,
                    distractor_image__isnull=False,
                ),
                name="workunit_explanation_is_complete",
            ),
            models.CheckConstraint(
                condition=Q(kind="explanation") | ~Q(backbone_kind=""),
                name="workunit_model_names_its_kind",
            ),
            models.UniqueConstraint(
                fields=["condition", "pair", "candidate"],
                condition=Q(kind="explanation"),
                name="workunit_one_per_candidate",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.status})"
