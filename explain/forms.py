"""Forms of the explain admin's own pages: importing a data set, choosing mined class pairs for a study."""

from django import forms

from .models import Backbone, Classifier, Dataset


class DatasetImportForm(forms.Form):
    kind = forms.ChoiceField(choices=Dataset.Kind.choices)
    path = forms.CharField(
        required=False,
        max_length=1000,
        help_text="A folder on the worker's machine. Leave empty for Fashion-MNIST (Debian's files).",
    )
    name = forms.CharField(
        required=False, max_length=200, help_text="Default: Fashion-MNIST, or the folder's name."
    )
    limit = forms.IntegerField(
        required=False, min_value=1, help_text="Only the first N images per split and class."
    )
    skip_corrupt = forms.BooleanField(
        required=False,
        help_text="Leave out unreadable images and write a report, instead of refusing the import.",
    )

    def clean(self):
        data = super().clean()
        if data.get("kind") != Dataset.Kind.FASHION_MNIST and not data.get("path"):
            self.add_error("path", f"A {data.get('kind')} import needs the path of the data set's folder.")
        return data


class BackboneRegisterForm(forms.Form):
    """``explain.services.backbone_register``'s arguments; the format's options one ``key=value`` a line."""

    dataset = forms.ModelChoiceField(queryset=Dataset.objects.order_by("name"))
    kind = forms.ChoiceField(choices=Backbone.Kind.choices)
    format_name = forms.CharField(
        label="format", max_length=100, help_text="One of the formats listed above."
    )
    path = forms.CharField(max_length=1000, help_text="A directory or file on the worker's machine.")
    name = forms.CharField(max_length=200)
    classifier = forms.ModelChoiceField(
        queryset=Classifier.objects.order_by("name"),
        required=False,
        help_text="The classifier to check it against (default: the data set's newest).",
    )
    options = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="One key=value a line, e.g. image_range=-1,1 (autoencoder) or autoencoder=NAME (denoiser).",
    )

    def clean_options(self) -> dict[str, str]:
        options = {}
        for line in self.cleaned_data["options"].splitlines():
            if not line.strip():
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise forms.ValidationError(f"{line!r} is not key=value; e.g. image_range=-1,1")
            options[key.strip()] = value.strip()
        return options

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if Backbone.objects.filter(name=name).exists():
            raise forms.ValidationError(f"A backbone named {name!r} already exists; choose another name.")
        return name

    def clean(self):
        data = super().clean()
        classifier, dataset = data.get("classifier"), data.get("dataset")
        if classifier and dataset and classifier.dataset_id != dataset.pk:
            self.add_error("classifier", f"{classifier.name!r} is a classifier of another data set.")
        return data


class MinePairsForm(forms.Form):
    method = forms.ChoiceField(
        choices=[
            ("most_confused", "most-confused class per class"),
            ("top_k", "top-k confused pairs"),
            ("attributes", "nearest class by attributes"),
        ]
    )
    k = forms.IntegerField(min_value=1, initial=10, help_text="Pairs for top-k.")
