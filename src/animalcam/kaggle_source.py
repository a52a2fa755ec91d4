"""Animals-10 from Kaggle: the dataset ``data.kaggle_dataset`` as one zip, fetched with
the ``kaggle`` package and the user's own Kaggle credentials.

The client is imported only when a download is asked for (importing it already tries to
authenticate). What it prints and what its exceptions say are redacted
(:mod:`animalcam.kaggle_redaction`); its failures become one-line errors that say how to
fix them, or how to use a local copy instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from animalcam import progress
from animalcam.errors import (
    AnimalcamError,
    CredentialsError,
    DataError,
    DownloadError,
    SourceNotFoundError,
)
from animalcam.kaggle_redaction import kaggle_output, kaggle_secrets, redact

logger = logging.getLogger(__name__)

KAGGLE = "kaggle"  # the data.source value that means "download from Kaggle"

LOCAL_COPY_HINT = (
    "or use a local copy instead: set data.source: path/to/animals10.zip (or its unpacked "
    "folder) in params.yaml, or run dvc exp run -S data.source=path/to/animals10.zip"
)
CREDENTIALS_HINT = (
    "get an API token at https://www.kaggle.com/settings/api and save it as "
    "~/.kaggle/kaggle.json (or $KAGGLE_CONFIG_DIR/kaggle.json), or set KAGGLE_USERNAME and "
    "KAGGLE_KEY, or put a new-style token in KAGGLE_API_TOKEN or ~/.kaggle/access_token "
    "(or run kaggle auth login); " + LOCAL_COPY_HINT
)


def is_kaggle_source(source: str) -> bool:
    return source.strip().lower() == KAGGLE


def download_kaggle_zip(dataset: str, dest_dir: Path) -> Path:
    """Download the Kaggle dataset ``dataset`` as one zip into ``dest_dir``; return its path.

    Raises CredentialsError (none found, or rejected: HTTP 401/403), SourceNotFoundError
    (HTTP 404) or DownloadError (network trouble, other HTTP errors, anything else the
    client raises). The client's own output is captured and redacted (see
    :func:`kaggle_output`).
    """
    import requests  # a dependency of kaggle; only needed on this path

    api = _new_kaggle_api()
    try:
        # Without credentials, KaggleApi prints its help to stdout and calls exit(1).
        with kaggle_output(lambda: kaggle_secrets(api)):
            api.authenticate()
    except SystemExit:
        raise CredentialsError(f"No Kaggle credentials found; {CREDENTIALS_HINT}.") from None
    except requests.HTTPError as exc:
        raise _http_error(exc, dataset, api) from None
    except requests.RequestException as exc:
        raise _network_error(exc, dataset, api) from None
    except Exception as exc:  # the client's own failures: one redacted line, not a traceback
        raise _client_error(exc, dataset, api) from None

    logger.info("Downloading Kaggle dataset %s (animals10 is about 600 MB)", dataset)
    quiet = progress.quiet()  # asked before stderr is captured
    try:
        with kaggle_output(lambda: kaggle_secrets(api)):
            api.dataset_download_files(
                dataset, path=str(dest_dir), force=True, quiet=quiet, unzip=False
            )
    except requests.HTTPError as exc:
        raise _http_error(exc, dataset, api) from None
    except requests.RequestException as exc:
        raise _network_error(exc, dataset, api) from None
    except OSError as exc:  # writing the zip: a full disk, a read-only folder
        raise DownloadError(
            f"Kaggle download of {dataset!r} could not be saved in {dest_dir} "
            f"({_short(exc, kaggle_secrets(api))}); free some disk space and try again, "
            f"{LOCAL_COPY_HINT}."
        ) from None
    except SystemExit:  # the client exits when it finds no credentials late
        raise CredentialsError(f"No Kaggle credentials found; {CREDENTIALS_HINT}.") from None
    except Exception as exc:  # a malformed dataset name, a truncated download, ...
        raise _client_error(exc, dataset, api) from None
    zips = sorted(dest_dir.glob("*.zip"))
    if len(zips) != 1:
        found = ", ".join(p.name for p in dest_dir.iterdir()) or "nothing"
        raise DataError(
            f"Kaggle download of {dataset!r} gave {found} instead of one zip archive; check "
            f"data.kaggle_dataset, {LOCAL_COPY_HINT}."
        )
    return zips[0]


def _new_kaggle_api():
    """A fresh, unauthenticated ``KaggleApi``; tests replace this function with a fake.

    Imported here, not at the top: importing ``kaggle`` already tries to authenticate (and
    prints help when it cannot), which a run from a local copy must never do.
    """
    try:
        with kaggle_output(lambda: kaggle_secrets(None)):
            from kaggle.api.kaggle_api_extended import KaggleApi
    except (ImportError, OSError) as exc:
        raise DownloadError(
            f"The kaggle package cannot be loaded ({_short(exc, kaggle_secrets(None))}); "
            f"pip install kaggle, {LOCAL_COPY_HINT}."
        ) from None
    return KaggleApi()


def _http_error(exc, dataset: str, api) -> AnimalcamError:
    status = getattr(exc.response, "status_code", None)
    if status == 401:
        return CredentialsError(
            f"Kaggle rejected the credentials from {_credentials_source(api)} (HTTP 401); "
            f"they may be wrong or revoked: {CREDENTIALS_HINT}."
        )
    if status == 403:
        return CredentialsError(
            f"Kaggle refused access to {dataset} with the credentials from "
            f"{_credentials_source(api)} (HTTP 403); the token may be expired or the account "
            f"unverified: {CREDENTIALS_HINT}."
        )
    if status == 404:
        return SourceNotFoundError(
            f"Kaggle has no dataset {dataset!r} (HTTP 404); check data.kaggle_dataset in "
            f"params.yaml (default alessiocorrado99/animals10), {LOCAL_COPY_HINT}."
        )
    return DownloadError(
        f"Kaggle answered HTTP {status} for {dataset} ({_short(exc, kaggle_secrets(api))}); "
        f"try again later, {LOCAL_COPY_HINT}."
    )


def _network_error(exc: Exception, dataset: str, api=None) -> DownloadError:
    return DownloadError(
        f"Could not reach Kaggle to download {dataset} ({type(exc).__name__}: "
        f"{_short(exc, kaggle_secrets(api))}); check the network connection or proxy "
        f"(HTTPS_PROXY), {LOCAL_COPY_HINT}."
    )


def _client_error(exc: Exception, dataset: str, api) -> DownloadError:
    return DownloadError(
        f"Kaggle download of {dataset!r} failed ({type(exc).__name__}: "
        f"{_short(exc, kaggle_secrets(api))}); check data.kaggle_dataset "
        f"('<owner>/<dataset>[/<version>]') and try again, {LOCAL_COPY_HINT}."
    )


def _credentials_source(api) -> str:
    """Where KaggleApi found the credentials it used, for the error message."""
    config_values = getattr(api, "config_values", None)
    method = str(config_values.get("auth_method", "")) if isinstance(config_values, dict) else ""
    if method == "ACCESS_TOKEN":
        return (
            "KAGGLE_API_TOKEN" if os.environ.get("KAGGLE_API_TOKEN") else "~/.kaggle/access_token"
        )
    if method == "OAUTH":
        return "kaggle auth login (~/.kaggle/credentials.json)"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    config = getattr(api, "config", None)
    return redact(str(config), kaggle_secrets(api)) if config else "your Kaggle configuration"


def _short(exc: BaseException, secrets: Iterable[str] = (), limit: int = 160) -> str:
    """An exception as one short line, redacted before it is cut (so no part of a
    secret survives the cut)."""
    text = redact(" ".join(str(exc).split()), secrets)
    return text if len(text) <= limit else text[: limit - 3] + "..."
