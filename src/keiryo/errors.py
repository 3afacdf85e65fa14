"""Errors a user can cause. The CLI catches `KeiryoError` once and prints its one-line message."""

from __future__ import annotations


class KeiryoError(Exception):
    """Base of every error caused by user input; its message is one line that says what to fix."""


class DataError(KeiryoError):
    """A data set could not be read: missing file, wrong format, mismatched shapes."""


class ModelError(KeiryoError):
    """A model could not be built or does not fit the data."""


class ArtifactError(KeiryoError):
    """A model file is missing, corrupt, foreign, or needs code that was not trusted."""


class ConfigError(KeiryoError):
    """An option or recipe value is invalid."""
