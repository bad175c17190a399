"""The researcher's study form: every field with help, and the conditions as one methods x setups grid."""

from django import forms
from django.forms.widgets import Widget
from django.utils.html import format_html, format_html_join

from .models import Condition, Correction, Study
from .selectors import method_catalogue

SETUP_HELP = {
    Condition.Setup.RANDOM: "Query and distractor images drawn at random from the two classes.",
    Condition.Setup.CONSISTENT: (
        "Query and distractor images chosen so that their parts correspond (Vandenhende et al. 2022, "
        "section 3.2): the replaced regions show the same part of the object."
    ),
}


def _key(method: str, setup: str) -> str:
    return f"{method}|{setup}"


class ConditionGrid(Widget):
    """Checkboxes in a table: one row per method (with its paper), one column per setup; methods that cannot
    run on this installation are shown disabled with the reason."""

    def __init__(self, catalogue: list[dict], attrs=None) -> None:
        super().__init__(attrs)
        self.catalogue = catalogue

    def value_from_datadict(self, data, files, name):
        return data.getlist(name) if hasattr(data, "getlist") else data.get(name, [])

    def render(self, name, value, attrs=None, renderer=None) -> str:
        chosen = set(value or [])
        disabled_all = bool((attrs or {}).get("disabled")) or bool(self.attrs.get("disabled"))
        head = format_html_join(
            "",
            '<th class="setup">{}<br><span class="help">{}</span></th>',
            ((label, SETUP_HELP[s]) for s, label in Condition.Setup.choices),
        )
        rows = []
        for method in self.catalogue:
            cells = []
            for setup, _ in Condition.Setup.choices:
                key = _key(method["name"], setup)
                off = disabled_all or (method["unavailable"] and key not in chosen)
                cells.append(
                    format_html(
                        '<td><input type="checkbox" name="{}" value="{}" id="id_{}_{}"{}{}></td>',
                        name,
                        key,
                        name,
                        key.replace("|", "_"),
                        " checked" if key in chosen else "",
                        " disabled" if off else "",
                    )
                )
            why = (
                format_html(
                    '<br><span class="grid-unavailable">cannot run here: {}</span>', method["unavailable"]
                )
                if method["unavailable"]
                else ""
            )
            rows.append(
                format_html(
                    '<tr class="{}"><th scope="row"><code>{}</code> {}<br>'
                    '<span class="help">{}</span>{}</th>{}</tr>',
                    "unavailable" if method["unavailable"] else "",
                    method["name"],
                    method["title"],
                    method["paper"],
                    why,
                    format_html_join("", "{}", ((c,) for c in cells)),
                )
            )
        return format_html(
            '<table class="condition-grid"><thead><tr><th>method</th>{}</tr></thead>'
            "<tbody>{}</tbody></table>",
            head,
            format_html_join("", "{}", ((r,) for r in rows)),
        )


class StudyForm(forms.ModelForm):
    conditions_grid = forms.MultipleChoiceField(
        label="Conditions (method x pair-selection setup)",
        required=False,
        help_text=(
            "Each ticked cell is one condition: a method (row) shown on image pairs chosen by a setup "
            "(column). A method that cannot run on this installation is greyed out with the reason."
        ),
    )

    class Meta:
        model = Study
        fields = (
            "title", "description", "dataset", "classifier", "n_prelearning", "n_learning", "n_test",
            "catch_trials_per_pair", "min_learning_seconds", "min_rt_ms", "time_limit_minutes", "label_a",
            "label_b", "blur_sigma", "design", "pairs_per_assignment", "seed", "exclusion_rules",
            "excluded_studies", "completion_code", "prolific_completion_code", "mturk_sandbox",
        )  # fmt: skip

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        catalogue = method_catalogue(dataset_id=self.instance.dataset_id if self.instance.pk else None)
        field = self.fields["conditions_grid"]
        field.choices = [
            (_key(m["name"], s), f"{m['name']} / {s}") for m in catalogue for s in Condition.Setup
        ]
        field.widget = ConditionGrid(catalogue)
        field.error_messages["invalid_choice"] = (
            "No counterfactual method is registered for the condition %(value)s (method|setup). Registered "
            f"methods: {', '.join(m['name'] for m in catalogue)}; "
            f"setups: {', '.join(Condition.Setup.values)}."
        )
        self.unavailable = {m["name"]: m["unavailable"] for m in catalogue if m["unavailable"]}
        if self.instance.pk:
            field.initial = [_key(c.method, c.setup) for c in self.instance.conditions.all()]
            if "excluded_studies" in self.fields:
                excluded = self.fields["excluded_studies"]
                excluded.queryset = excluded.queryset.exclude(pk=self.instance.pk)
            if self.instance.is_frozen:
                field.disabled = True

    def clean_conditions_grid(self) -> list[tuple[str, str]]:
        chosen = [tuple(v.split("|", 1)) for v in self.cleaned_data["conditions_grid"]]
        before = set(self.fields["conditions_grid"].initial or [])
        for method, setup in chosen:
            if method in self.unavailable and _key(method, setup) not in before:
                raise forms.ValidationError(
                    f"Method {method!r} cannot run on this installation: {self.unavailable[method]}."
                )
        return chosen


class CorrectionForm(forms.ModelForm):
    class Meta:
        model = Correction
        fields = ("study", "kind", "trial", "assignment", "withdrawn", "corrected_answer", "reason")
