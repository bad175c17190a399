"""The one error of ``explain.nets.formats``."""


class FormatError(ValueError):
    """A model that cannot be used: ``problem`` says what is wrong (with the value), ``fix`` what to do."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}.")
        self.problem, self.fix = problem, fix
