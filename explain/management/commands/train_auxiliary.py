"""Train the small SimSiam auxiliary model on a data set, or register a local ResNet-50 state_dict as one:
``manage.py train_auxiliary --dataset Fashion-MNIST``, or
``train_auxiliary --dataset CUB --resnet50 swav.pth``."""

from django.core.management.base import BaseCommand

from explain.services import auxiliary_register, auxiliary_train

from ._common import dataset_named, enqueue, run


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True)
        parser.add_argument("--name")
        parser.add_argument("--resnet50", help="register this local ResNet-50 state_dict instead of training")
        parser.add_argument("--epochs", type=int, default=10)
        parser.add_argument("--batch-size", type=int, default=128)
        parser.add_argument("--lr", type=float, default=0.05)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--limit", type=int, help="train on the first N images per class")
        parser.add_argument("--background", action="store_true", help="queue the training for a worker")

    def handle(self, *args, dataset, name, resnet50, background, **options):
        data = dataset_named(dataset)
        if resnet50:
            backbone = run(
                lambda: auxiliary_register(dataset=data, name=name or f"{data.name} ResNet-50", path=resnet50)
            )
        else:
            params = {k: options[k] for k in ("epochs", "batch_size", "lr", "seed", "limit")}
            if background:
                return enqueue(self, "auxiliary_train", {"dataset_id": data.pk, "name": name, **params})
            backbone = run(lambda: auxiliary_train(dataset=data, name=name, **params))
            self.stdout.write(
                f"SimSiam loss per epoch: {[round(v, 3) for v in backbone.provenance['epoch_losses']]}"
            )
        self.stdout.write(f"Auxiliary model {backbone.name!r}: {backbone.path}")
        check = backbone.provenance.get("part_clustering")
        if check:
            self.stdout.write(
                f"Part clustering: accuracy {check['accuracy']:.3f} over {check['n_cells']} cells, "
                f"{check['n_parts']} parts, {check['images']} test images"
            )
