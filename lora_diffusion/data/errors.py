"""The errors and warnings of the data pipeline."""

import warnings


class DatasetError(ValueError):
    """Bad training data or dataset settings; the message names the file, folder or option."""


class DatasetWarning(UserWarning):
    """Something in the data was skipped or guessed; training goes on."""


def warn(message):
    warnings.warn(message, DatasetWarning, stacklevel=3)
