"""The course's own exceptions: each says which argument or file is wrong and what to do.

Each also inherits the matching built-in exception, so ``except ValueError`` (or
``pytest.raises(ValueError)``) still catches a bad value, ``FileNotFoundError`` a missing file.
"""
from __future__ import annotations


class KWSError(Exception):
    """Base class of every error raised on purpose by kws_utils."""


class InputError(KWSError, ValueError):
    """An argument with the wrong shape, size or value (out of its valid range)."""


class InputTypeError(KWSError, TypeError):
    """An argument of the wrong type (e.g. a string where a number is needed)."""


class ConfigError(KWSError, ValueError):
    """An environment variable (KWS_...) holding a value the course cannot use."""


class FileFormatError(KWSError, ValueError):
    """A file that exists but is not what was expected (corrupt, truncated, another format)."""


class MissingFileError(KWSError, FileNotFoundError):
    """A file the course needs that is not there."""


class TrainingDiverged(KWSError, FloatingPointError):
    """Training produced a non-finite loss (NaN or inf) and was stopped."""


class TargetExistsError(KWSError, FileExistsError):
    """A target path that exists and is not the course's own, so it is left untouched."""


class WriteError(KWSError, OSError):
    """A file that could not be written (full disk, no permission, a file where a folder should be)."""


class BusyError(KWSError, RuntimeError):
    """A folder that another running process is writing (its lock file is held)."""
