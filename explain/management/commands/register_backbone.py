"""Register a researcher's generative model from local files, checked against the data set and a classifier:
``manage.py register_backbone --dataset CUB --kind autoencoder --format diffusers-autoencoder
--path /models/sd-vae --name "SD VAE" --option image_range=-1,1``. The formats of each kind are listed by
``--help`` (``explain.nets.formats``)."""

from django.core.management.base import BaseCommand, CommandError

from explain.models import Backbone
from explain.services import backbone_register

from ._common import classifier_named, dataset_named, run


def _formats_help() -> str:
    from explain.nets.formats import FORMATS

    return "; ".join(f"{f.name} ({f.kind}): {f.layout}" for f in FORMATS.values())


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True)
        parser.add_argument("--kind", required=True, choices=Backbone.Kind.values)
        parser.add_argument("--path", required=True, help="a local directory or file (nothing is downloaded)")
        parser.add_argument("--format", required=True, dest="format_name", help=_formats_help())
        parser.add_argument("--name", required=True)
        parser.add_argument(
            "--classifier", help="the classifier to check it against (default: the data set's newest)"
        )
        parser.add_argument(
            "--option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a format option, e.g. image_range=-1,1 (autoencoder), autoencoder=NAME (denoiser, the "
            "autoencoder it was trained with), image_size=256 (Stable Diffusion)",
        )

    def handle(self, *args, dataset, kind, path, format_name, name, classifier, option, **_):
        options = {}
        for item in option:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise CommandError(f"--option {item!r} is not KEY=VALUE; e.g. --option image_range=-1,1")
            options[key.strip()] = value.strip()
        data = dataset_named(dataset)
        checked_with = classifier_named(classifier) if classifier else None
        backbone = run(
            lambda: backbone_register(
                dataset=data,
                kind=kind,
                path=path,
                format_name=format_name,
                name=name,
                classifier=checked_with,
                options=options,
            )
        )
        found = {k: v for k, v in backbone.config.items() if k not in {"registered", "options"}}
        self.stdout.write(f"Registered {backbone.name!r} ({kind}, {format_name}) for {data.name!r}.")
        self.stdout.write("Found: " + ", ".join(f"{k} {v}" for k, v in found.items()))
