"""The errors of reading and writing LoRA files, at the bottom of the package: it imports nothing of it, so the
adapter algorithms (core/adapters/) and the file readers (core/kohya.py, formats/cloneofsimo.py) can both raise them
without importing each other."""


class LoRAFileError(ValueError):
    """A file that is not a LoRA this library can read or write."""


class LoRAFileWarning(UserWarning):
    """Part of a LoRA file was not used; the message says which and why."""
