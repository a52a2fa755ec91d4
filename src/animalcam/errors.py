"""One exception family for everything a user can get wrong.

Every error says what was found and how to fix it. Each class also derives from the
builtin that fits, so callers that already catch ``ValueError`` or ``FileNotFoundError``
keep working. Stage entry points (see :mod:`animalcam.stage`) turn these into one line
on stderr and a non-zero exit.
"""

from __future__ import annotations


class AnimalcamError(Exception):
    """Base class: a problem the user can fix (bad params, bad data, missing file)."""


class ParamsError(AnimalcamError, ValueError):
    """params.yaml has an unknown key, a wrong type or an out-of-range value."""


class DataError(AnimalcamError, ValueError):
    """The dataset is unusable as given (empty, unknown class folder, too few images)."""


class SourceNotFoundError(AnimalcamError, FileNotFoundError):
    """A path named by the user (dataset, weights file, model) does not exist."""


class UnsafeArchiveError(AnimalcamError, ValueError):
    """An archive would write outside its target, holds links, or is implausibly large."""


class CredentialsError(AnimalcamError, PermissionError):
    """Kaggle credentials are missing or were rejected."""


class ModelError(AnimalcamError, ValueError):
    """A model or weights file does not fit what the params ask for."""


class StateError(AnimalcamError, OSError):
    """Saved state (``.train_state/``) is in the way and cannot be discarded by the code."""


class TrackingError(AnimalcamError, ConnectionError):
    """The MLflow tracking store cannot be reached or refused to record something."""


class DownloadError(AnimalcamError, ConnectionError):
    """Kaggle could not be reached, or the download failed for a reason other than access."""


class EnvironmentVariableError(AnimalcamError, ValueError):
    """An environment variable animalcam reads (ANIMALCAM_LOG_LEVEL, ...) holds a bad value."""


class ClusterError(AnimalcamError, ConnectionError):
    """A multi-worker training (``TF_CONFIG``) lost a worker, or its workers disagree."""
