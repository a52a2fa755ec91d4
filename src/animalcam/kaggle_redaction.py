"""The kaggle client's output and errors, with its credentials taken out.

The ``kaggle`` client's own output is never passed on as it is: with ``VERBOSE=1`` it
prints request headers, credentials included. :func:`kaggle_output` captures it, and
only lines with anything that looks like a credential replaced by ``[redacted]`` reach
the log; error messages built from its exceptions go through :func:`redact` the same way.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

from animalcam.progress import quiet

logger = logging.getLogger(__name__)

# Lines of the kaggle client's output longer than this are logged in pieces rather than
# held in memory until a newline that may never come.
_MAX_PENDING = 64 * 1024

# What a credential looks like in text we did not write: request headers, key=value pairs
# (also JSON and YAML), and user:password in URLs. Values of the known secrets are
# replaced first (see kaggle_secrets), these catch the rest.
_CREDENTIAL_PATTERNS = (
    (
        re.compile(r"(?i)\b((?:proxy-)?authorization|(?:set-)?cookie|x-xsrf-token)\s*:\s*[^\r\n]*"),
        r"\1: [redacted]",
    ),
    (re.compile(r"(?i)\b(basic|bearer)\s+[A-Za-z0-9._~+/=-]{6,}"), r"\1 [redacted]"),
    (
        re.compile(
            r"(?i)\b([\w-]*(?:key|token|secret|passw(?:or)?d|pwd)[\w-]*)"
            r"([\"']?\s*[:=]\s*[\"']?)[^\s\"'&,;)}\]]+"
        ),
        r"\1\2[redacted]",
    ),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"), r"\1[redacted]@"),
)
_REDACTED = "[redacted]"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret value and anything shaped like a credential
    replaced by ``[redacted]``."""
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    for pattern, replacement in _CREDENTIAL_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def kaggle_secrets(api=None) -> list[str]:
    """The Kaggle credential values this process knows: environment variables, what the
    client loaded, and their Basic-auth encoding; longest first (so no part is left)."""
    config = getattr(api, "config_values", None)
    config = config if isinstance(config, dict) else {}
    keys = [
        os.environ.get("KAGGLE_KEY"),
        os.environ.get("KAGGLE_API_TOKEN"),
        config.get("key"),
        config.get("token"),
    ]
    users = {os.environ.get("KAGGLE_USERNAME"), config.get("username")}
    values = set(keys)
    for user in users:
        for key in keys:
            if isinstance(user, str) and isinstance(key, str):
                values.add(base64.b64encode(f"{user}:{key}".encode()).decode())
    # Short values would blank ordinary words out of every line.
    return sorted((v for v in values if isinstance(v, str) and len(v) >= 6), key=len, reverse=True)


class _RedactedLog(io.TextIOBase):
    """A text stream that logs each complete line it is given, redacted.

    Progress bars (lines ended by a carriage return) go, redacted, to ``terminal`` when
    there is one (a person watching) and nowhere otherwise.
    """

    def __init__(self, secrets: Callable[[], list[str]], terminal: TextIO | None) -> None:
        super().__init__()
        self._secrets = secrets
        self._terminal = terminal
        self._pending = ""
        self._drew_progress = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        while match := re.search(r"[\r\n]", self._pending):
            line, self._pending = self._pending[: match.start()], self._pending[match.end() :]
            self._emit(line, progress=match.group() == "\r")
        if len(self._pending) > _MAX_PENDING:
            line, self._pending = self._pending, ""
            self._emit(line, progress=False)
        return len(text)

    def close(self) -> None:
        if not self.closed:
            if self._pending:
                self._emit(self._pending, progress=False)
                self._pending = ""
            if self._drew_progress and self._terminal is not None:
                self._terminal.write("\n")
        super().close()

    def _emit(self, line: str, progress: bool) -> None:
        line = redact(line, self._secrets()).rstrip()
        if not line.strip():
            return
        if not progress:
            logger.info("kaggle: %s", line)
        elif self._terminal is not None:
            self._terminal.write("\r" + line)
            self._terminal.flush()
            self._drew_progress = True


@contextlib.contextmanager
def kaggle_output(secrets: Callable[[], list[str]]) -> Iterator[None]:
    """Capture what the kaggle client prints (stdout and stderr) and log it redacted.

    With ``VERBOSE=1`` the client prints every request with its headers, the
    ``Authorization`` header included; nothing it prints reaches the terminal as it is.
    """
    terminal = sys.stderr if quiet() is False else None
    stream = _RedactedLog(secrets, terminal)
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            yield
    finally:
        stream.close()
