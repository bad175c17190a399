"""The trained models the embedded default (Fashion-MNIST) ships with, and the Django-free command that made
them: ``python -m explain.shipped.train --kind <kind> --out <dir>`` (see ``manifest.json`` for each model's
exact command, seed, data, steps, final losses and quality card)."""
