"""Credentials of the tracking store (in the URI, or MLFLOW_TRACKING_TOKEN/_PASSWORD)
never show in a stage's stdout, stderr, log lines, error message or files, whatever the
kind of store and however it fails."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from test_serving import free_port

from animalcam import tracking_secrets

PASSWORD = "Pw-s3cr3t-9f2c"  # distinctive: found only where it leaked
STAGE = REPO_ROOT / "stages/prepare.py"


@pytest.fixture
def echo_server():
    """An HTTP server that passes the tracking probe, then answers every MLflow request
    with a 400 whose message echoes the URL and the Authorization header, as careless
    proxies do. Yields its port."""

    class Echo(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/api/2.0/mlflow/experiments/search"):
                self.answer(200, {"experiments": []})
            else:
                self.echo()

        def do_POST(self):
            self.echo()

        def echo(self):
            seen = f"{self.path} Authorization: {self.headers.get('Authorization')}"
            self.answer(400, {"error_code": "BAD_REQUEST", "message": seen})

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def run_stage(workspace: Path, uri: str, **env: str) -> subprocess.CompletedProcess:
    (workspace / "params.yaml").write_text("mlflow:\n  experiment: secrets\n")
    environment = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "ANIMALCAM_LOG_LEVEL": "DEBUG",  # every log line of ours and MLflow's to stderr
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        **env,
    }
    return subprocess.run(
        [sys.executable, str(STAGE)],
        cwd=workspace,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_nothing_leaked(result: subprocess.CompletedProcess, workspace: Path) -> str:
    """The stage failed with one line that does not hold the password; no file holds it
    either. Returns that line."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("animalcam prepare: error: MLflow"), lines
    assert "Traceback" not in result.stderr
    for secret in (PASSWORD, PASSWORD.replace("-", "%2D")):
        assert secret not in result.stdout and secret not in result.stderr
    for path in workspace.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
    assert not (workspace / "models/mlflow_run.json").exists()
    return lines[0]


DATABASES = [
    "postgresql://alice:{pw}@127.0.0.1:{port}/mlflow",
    "postgresql+psycopg2://alice:{pw}@127.0.0.1:{port}/mlflow",
    "postgresql://127.0.0.1:{port}/mlflow?user=alice&password={pw}",
    "mysql://alice:{pw}@127.0.0.1:{port}/mlflow",
    "mysql+pymysql://alice:{pw}@127.0.0.1:{port}/mlflow?charset=utf8mb4",
    "mssql://alice:{pw}@127.0.0.1:{port}/mlflow",
    "mssql+pyodbc://alice:{pw}@127.0.0.1:{port}/mlflow?driver=ODBC+Driver+18",
    "postgresql://alice:{pw}@127.0.0.1:not-a-port/mlflow",  # a URI SQLAlchemy cannot parse
    "http://alice:{pw}@127.0.0.1:{port}/",
    "https://alice:{pw}@127.0.0.1:{port}/",
    "https://{pw}@127.0.0.1:{port}/",  # a token as the user
]


@pytest.mark.parametrize("template", DATABASES)
def test_an_unreachable_store_fails_without_showing_its_password(template, tmp_path):
    """Nothing listens on the port (or the database driver is not installed): one line
    that names the store, without its credentials."""
    uri = template.format(pw=PASSWORD, port=free_port())
    line = assert_nothing_leaked(run_stage(tmp_path, uri), tmp_path)
    assert tracking_secrets.public_uri(uri) in line


@pytest.mark.parametrize(
    "env", [{"MLFLOW_TRACKING_TOKEN": PASSWORD}, {"MLFLOW_TRACKING_PASSWORD": PASSWORD}]
)
def test_a_token_in_the_environment_never_shows(env, tmp_path, echo_server):
    """The server echoes the Authorization header in its error: masked."""
    uri = f"http://127.0.0.1:{echo_server}"
    line = assert_nothing_leaked(
        run_stage(tmp_path, uri, MLFLOW_TRACKING_USERNAME="alice", **env), tmp_path
    )
    assert "could not" in line and tracking_secrets.REDACTED in line


def test_a_server_echoing_the_request_never_shows_the_password(tmp_path, echo_server):
    """MLflow's error quotes the server's message, which quotes the URL and the basic-auth
    header requests built from user:password@."""
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{echo_server}/"
    line = assert_nothing_leaked(run_stage(tmp_path, uri), tmp_path)
    assert tracking_secrets.REDACTED in line and f"http://127.0.0.1:{echo_server}/" in line


def test_public_uri_and_redact_cover_every_spelling(monkeypatch):
    cases = {
        "postgresql+psycopg2://bob:p%40ss/w:rd@db:5432/m?sslmode=require": (
            "postgresql+psycopg2://db:5432/m",
            ["p%40ss/w:rd", "p@ss/w:rd"],
        ),
        "mysql://db/m?user=bob&password=s3cr%2Bet": ("mysql://db/m", ["s3cr%2Bet", "s3cr+et"]),
        "mssql+pyodbc:///?odbc_connect=DRIVER%3D%7Bx%7D%3BUID%3Db%3BPWD%3DtopSecret1": (
            "mssql+pyodbc:///",
            ["topSecret1"],
        ),
        "https://tok3n-value@host/x#frag": ("https://host/x", ["tok3n-value"]),
    }
    for uri, (public, secrets) in cases.items():
        assert tracking_secrets.public_uri(uri) == public
        message = f"failed: {uri} (password {' / '.join(secrets)})"
        redacted = tracking_secrets.redact(message, uri)
        assert public in redacted
        assert not any(secret in redacted for secret in secrets), redacted
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "env-token-123")
    assert tracking_secrets.redact("Bearer env-token-123") == f"Bearer {tracking_secrets.REDACTED}"
    assert tracking_secrets.public_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_log_records_are_masked(caplog, monkeypatch):
    """MLflow logs its retries with the exception; a record holding the password, in its
    message, arguments or traceback, leaves the handlers masked."""
    uri = f"mysql://alice:{PASSWORD}@db/m"
    handler = logging.StreamHandler()
    logging.getLogger("some.library").addHandler(handler)
    try:
        tracking_secrets.guard_secrets(uri)
        assert tracking_secrets.SECRET_FILTER in caplog.handler.filters
        assert tracking_secrets.SECRET_FILTER in handler.filters
        logger = logging.getLogger("some.library")
        logger.warning("engine for %s failed", uri)
        try:
            raise RuntimeError(f"cannot log in with {PASSWORD}")
        except RuntimeError:
            logger.exception("retrying")
    finally:
        logging.getLogger("some.library").removeHandler(handler)
        monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    assert "mysql://db/m" in caplog.text
    assert PASSWORD not in caplog.text
