"""The progress callback every long-running service takes: ``progress(done, total)``."""

from collections.abc import Callable

Progress = Callable[[int, int], None]
