"""A real, throwaway PostgreSQL server for the team-tracking tests.

initdb on a fresh folder, ``postgres`` on a free localhost port (TCP only), a role and
database for MLflow with a random password that only a pgpass file holds, so that no
command line, URI or log ever contains it. initdb refuses to run as root (CI runs as
root): the server then runs as the unprivileged ``postgres`` user (or ``nobody``).

Skips only when the PostgreSQL binaries are missing, and never when
``ANIMALCAM_REQUIRE_POSTGRES=1`` (set by .ci/run, so CI cannot skip it silently).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REQUIRE = "ANIMALCAM_REQUIRE_POSTGRES"
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class Postgres:
    port: int
    database: str
    user: str
    password: str  # for the tests' leak checks only; clients read it from pgpass_file
    pgpass_file: Path

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI MLflow takes, without the password (libpq reads pgpass)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    @property
    def client_env(self) -> dict[str, str]:
        return {"PGPASSFILE": str(self.pgpass_file)}


def postgres_binaries() -> Path | None:
    """The folder with initdb and postgres: on PATH, else Debian's versioned folder."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: this user, or an unprivileged one when this is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    pytest.fail("running as root and neither a 'postgres' nor a 'nobody' user exists")


@contextlib.contextmanager
def postgres_server(port: int) -> Iterator[Postgres]:
    binaries = postgres_binaries()
    if binaries is None:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"PostgreSQL binaries not found and {REQUIRE}=1")
        pytest.skip("PostgreSQL binaries (initdb, postgres) not installed")
    user = _server_user()
    as_user = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid}
    # Not under pytest's tmp_path: its root-owned 0700 parents would lock the server out.
    root = Path(tempfile.mkdtemp(prefix="animalcam-pg-"))
    server = None
    try:
        superuser_password = secrets.token_urlsafe(24)
        password = secrets.token_urlsafe(24)
        pwfile = root / "superuser.pw"
        pwfile.write_text(superuser_password)
        if user is not None:
            os.chown(root, user.pw_uid, user.pw_gid)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        os.chmod(pwfile, 0o600)
        data = root / "data"
        _run(
            [
                str(binaries / "initdb"),
                *("-D", str(data), "-U", "postgres", "-E", "UTF8", "--no-locale"),
                *("--auth", "scram-sha-256", "--pwfile", str(pwfile)),
            ],
            as_user,
        )
        pwfile.unlink()
        log = root / "server.log"
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [
                    str(binaries / "postgres"),
                    *("-D", str(data), "-p", str(port), "-k", ""),
                    *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **as_user,
            )
        _create_database(port, superuser_password, password, server, log)
        pgpass = root / "pgpass"
        pgpass.write_text(f"127.0.0.1:{port}:mlflow:mlflow:{password}\n")
        os.chmod(pgpass, 0o600)  # libpq ignores a pgpass file others can read
        yield Postgres(port, "mlflow", "mlflow", password, pgpass)
    finally:
        if server is not None and server.poll() is None:
            server.terminate()  # SIGTERM: PostgreSQL's "smart" shutdown; then insist
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(root, ignore_errors=True)


def _run(args: list[str], as_user: dict) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False, **as_user)
    if done.returncode != 0:
        pytest.fail(f"{Path(args[0]).name} failed ({done.returncode}):\n{done.stderr[-2000:]}")


def _create_database(port, superuser_password, password, server, log) -> None:
    import psycopg
    from psycopg import sql

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.poll() is not None:
            pytest.fail(f"postgres exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            connection = psycopg.connect(
                host="127.0.0.1",
                port=port,
                user="postgres",
                password=superuser_password,
                dbname="postgres",
                autocommit=True,
                connect_timeout=2,
            )
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                pytest.fail(f"postgres not up after {START_TIMEOUT_S} s:\n{log.read_text()}")
            time.sleep(0.3)
    with connection:
        connection.execute(
            sql.SQL("CREATE ROLE mlflow LOGIN PASSWORD {}").format(sql.Literal(password))
        )
        connection.execute("CREATE DATABASE mlflow OWNER mlflow")
