"""The trainer's error: a run that cannot go on."""


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to change."""
