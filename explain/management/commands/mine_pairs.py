"""Mine class pairs for a classifier and print them with their scores; with --study, add them to a study:
``manage.py mine_pairs --classifier fmnist-cnn --method top_k --k 5 [--study 3]``."""

from django.core.management.base import BaseCommand, CommandError

from explain.selectors import mined_pairs
from studies.services import study_pairs_add

from ._common import classifier_named, run


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("--classifier", required=True)
        parser.add_argument(
            "--method", default="most_confused", choices=["most_confused", "top_k", "attributes"]
        )
        parser.add_argument("--k", type=int, default=10, help="pairs for --method top_k")
        parser.add_argument("--study", type=int, help="add the mined pairs to the study with this id")

    def handle(self, *args, classifier, method, k, study, **options):
        from studies.models import Study

        model = classifier_named(classifier)
        pairs = run(lambda: mined_pairs(classifier=model, method=method, k=k))
        score = "distance" if method == "attributes" else "confusion"
        self.stdout.write(f"{'class A':<28} {'class B':<28} {score:>9}")
        for pair in pairs:
            self.stdout.write(f"{pair['class_a'].name:<28} {pair['class_b'].name:<28} {pair['score']:>9.4f}")
        if study is not None:
            target = Study.objects.filter(pk=study).first()
            if target is None:
                raise CommandError(f"No study with id {study}.")
            added = run(lambda: study_pairs_add(study=target, pairs=pairs))
            self.stdout.write(f"Added {len(added)} pairs to study {target.title!r}.")
