"""A private, throwaway PostgreSQL server for one test.

Fault-injection tests stop and restart the database under the service. The machine's
shared cluster (127.0.0.1:5432) serves other tests, so it must never be stopped; this
starts a server of the test's own instead: a fresh `initdb` in a temporary directory,
on a free port, with trust auth and fsync off, removed again when the test ends.

    async with private_postgres(tmp_path) as pg:
        engine = create_engine(pg.url)
        await pg.restart()

initdb and postgres refuse to run as root, so as root they run as the `postgres` OS
user. pytest's tmp_path sits under a root-only (0700) directory that user cannot enter,
so the cluster lives in a directory of its own under the system temp dir; only the
server's log is copied into tmp_path at the end, for reading after a failure.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Literal

DATABASE = "safeguard"
USER = "postgres"
START_TIMEOUT = 30  # seconds; pg_ctl waits this long for "ready" (or for the stop)
StopMode = Literal["smart", "fast", "immediate"]


def _bin_dir() -> Path | None:
    """Debian's newest /usr/lib/postgresql/<version>/bin, if it has what we run."""
    root = Path("/usr/lib/postgresql")
    versions = [p for p in root.glob("*/bin") if p.parent.name.isdigit()] if root.is_dir() else []
    for bin_dir in sorted(versions, key=lambda p: int(p.parent.name), reverse=True):
        if all((bin_dir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "createdb")):
            return bin_dir
    return None


def _as_postgres() -> dict[str, Any]:
    """subprocess arguments that drop root to the postgres user (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@functools.cache
def available() -> bool:
    """Whether the PostgreSQL binaries exist and we can run them (as `postgres` if root)."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        return False
    try:
        subprocess.run(
            [bin_dir / "initdb", "--version"],
            check=True,
            capture_output=True,
            timeout=10,
            cwd="/",
            **_as_postgres(),
        )
    except (KeyError, OSError, subprocess.SubprocessError):
        return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivatePostgres:
    """One private server: its data, socket and log in `directory`, listening on `port`."""

    def __init__(self, directory: Path, bin_dir: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.log = directory / "postgres.log"
        self.port = _free_port()
        self._bin = bin_dir

    @property
    def url(self) -> str:
        """A SQLAlchemy URL to the `safeguard` database, as the superuser `postgres`."""
        return f"postgresql+asyncpg://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    async def _run(self, tool: str, *args: str) -> None:
        """Run a PostgreSQL binary as the postgres user; raise with its output (and the
        server log's tail) if it fails."""
        process = await asyncio.create_subprocess_exec(
            self._bin / tool,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.directory,
            env={"PATH": "/usr/bin:/bin", "HOME": str(self.directory), "LC_ALL": "C"},
            **_as_postgres(),
        )
        try:
            async with asyncio.timeout(START_TIMEOUT + 30):  # beyond pg_ctl's own
                output, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            log_tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({process.returncode}):\n"
                f"{output.decode(errors='replace')}\n--- server log ---\n{log_tail}"
            )

    async def _create(self) -> None:
        await self._run(
            "initdb", "-D", str(self.data), "-U", USER, "--auth=trust",
            "--encoding=UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# private test server\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.directory}'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
            )
        await self.start()
        await self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, DATABASE)

    async def start(self) -> None:
        """Start the server; returns once it accepts connections (or raises after the
        deadline, with the server log)."""
        await self._run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log),
            "-w", "-t", str(START_TIMEOUT),
        )  # fmt: skip

    async def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server: "fast" disconnects clients; "immediate" aborts without a
        shutdown checkpoint (as a crash would); "smart" waits for every client to leave,
        so with an engine's pool still open it fails after START_TIMEOUT seconds."""
        await self._run(
            "pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", str(START_TIMEOUT)
        )

    async def restart(self, mode: StopMode = "fast") -> None:
        """Stop (in `mode`) and start again on the same port and data."""
        await self.stop(mode)
        await self.start()

    async def _shut_down(self) -> None:
        """Stop whatever still runs, however: pg_ctl first, the postmaster's pid last."""
        if not self.running:
            return
        with suppress(Exception):
            await self.stop("immediate")
        if self.running:
            with suppress(Exception):
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)


@asynccontextmanager
async def private_postgres(tmp_path: Path) -> AsyncIterator[PrivatePostgres]:
    """A running private server with an empty `safeguard` database; stopped and removed
    on exit, even if the test fails. Its log is left at tmp_path/postgres.log."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
    # A short path: a unix socket path must fit in ~107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="safeguard-pg-"))
    server = PrivatePostgres(directory, bin_dir)
    try:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(USER)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        await server._create()
        yield server
    finally:
        await server._shut_down()
        with suppress(OSError):
            shutil.copyfile(server.log, tmp_path / "postgres.log")
        shutil.rmtree(directory, ignore_errors=True)
