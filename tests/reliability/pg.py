"""A throwaway PostgreSQL cluster on loopback, in a temporary directory, for shared-study tests
and bench/workers.py. PostgreSQL refuses to run as root, so as root the server runs as the
`postgres` user that Debian's package creates (`.ci/run` installs it). Password authentication
is on, so tests can check that the password never leaks and that a wrong one is refused."""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "evomerge"
PASSWORD = "pg-test-secret-4f1c"  # distinctive, so leak checks can grep for it


class Unavailable(RuntimeError):
    """No PostgreSQL server could be started here (binaries, user or driver missing)."""


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise Unavailable(f"{name} not found (apt-get install postgresql)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """initdb + pg_ctl start in a fresh directory; `stop()` removes everything."""

    def __init__(self) -> None:
        if importlib.util.find_spec("psycopg") is None:  # the driver SQLAlchemy 2.1 uses for postgresql:// URLs
            raise Unavailable("psycopg is not installed (pip install -e '.[postgres]')")
        self.root = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
        self.port = _free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("running as root and there is no 'postgres' user to run the server") from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as_user = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]
        try:
            self._start()
        except Unavailable:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise Unavailable(f"{Path(args[0]).name} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")

    def _start(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD)
        shutil.chown(pwfile, *self._owner())
        self._run(_binary("initdb"), "-D", str(self.root / "data"), "-U", USER, f"--pwfile={pwfile}",
                  "--auth-host=scram-sha-256", "--auth-local=trust", "--no-sync")
        self._options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                   "-c full_page_writes=off -c max_connections=100")
        self._run(_binary("pg_ctl"), "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-o", self._options, "-w", "start")

    def _pg_ctl(self, *args: str) -> None:
        self._run(_binary("pg_ctl"), "-D", str(self.root / "data"), "-l", str(self.root / "log"), *args)

    def restart(self) -> None:
        """A fast shutdown (every connection terminated, as on a failover or an upgrade) and a start."""
        self._pg_ctl("-m", "fast", "-w", "restart")

    def halt(self) -> None:
        """Stopped until `resume()`: clients cannot connect."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Started again, on the same port and settings (a plain `pg_ctl start` would forget them)."""
        self._pg_ctl("-o", self._options, "-w", "start")

    def _owner(self) -> tuple[int, int]:
        stat = self.root.stat()
        return stat.st_uid, stat.st_gid

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh database (one per test keeps studies apart); returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run([*self._as_user, _binary("pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
