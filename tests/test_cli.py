"""The CLI and the server as a real process (SPEC §3, §10, §11 durability)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

import whatstracking
from conftest import ADMIN_TOKEN, upsert

SCRIPT = str(Path(whatstracking.__file__).resolve())
CONFIG_VARS = ("HOST", "PORT", "DATABASE_URL", "PUBLIC_URL", "ADMIN_TOKEN", "METRICS_TOKEN",
               "WEBHOOK_SHARED_TOKEN",
               "EVOLUTION_API_URL", "EVOLUTION_API_KEY", "LOG_LEVEL", "LOG_FORMAT", "TRUST_PROXY",
               "RETENTION_DAYS", "META_GRAPH_URL", "GA4_MP_URL", "SQLITE_SYNCHRONOUS")
EVERY_MIGRATION = [version for version, _sql in whatstracking.MIGRATIONS]


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def cli(*args: str, cwd: Path, timeout: float = 60, script: Path | str = SCRIPT,
        **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def cli_json(*args: str, cwd: Path, script: Path | str = SCRIPT, **env: str) -> dict:
    proc = cli(*args, cwd=cwd, script=script, **env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None,
         timeout: float = 10) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def program(tmp_path) -> Path:
    """A copy of whatstracking.py (with tracker.js) in a directory of its own, tmp_path/app:
    what is "beside the program" then stays out of the checkout."""
    app = tmp_path / "app"
    app.mkdir()
    for name in ("whatstracking.py", "tracker.js"):
        (app / name).write_bytes((Path(SCRIPT).parent / name).read_bytes())
    return app / "whatstracking.py"


class Server:
    """`python whatstracking.py` running in its own process."""

    def __init__(self, cwd: Path, script: Path | str = SCRIPT, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stderr_path = cwd / f"server-{self.port}.log"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script)], cwd=cwd, stdout=subprocess.DEVNULL, stderr=self._stderr,
            env=clean_env(HOST="127.0.0.1", PORT=str(self.port), ADMIN_TOKEN=ADMIN_TOKEN, **env))
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log}")
            try:
                if http("GET", self.base + "/healthz", timeout=2)[0] == 200:
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not answer /healthz in 30 s:\n{self.log}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        return self.stderr_path.read_text("utf-8", errors="replace")

    def url(self, path: str) -> str:
        return self.base + path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self._stderr.close()
        return code

    def ensure_stopped(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if not self._stderr.closed:
            self._stderr.close()


@pytest.fixture
def servers():
    started: list[Server] = []

    def start(cwd: Path, **env: str) -> Server:
        server = Server(cwd, **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.ensure_stopped()


async def pg_rows(database_url: str, sql: str, *args) -> list[dict]:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        return [dict(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def db_rows(database_url: str, sql: str, *args) -> list[dict]:
    """Rows read straight from the database file / server, outside WhatsTracking."""
    if database_url.startswith("postgres"):
        return await pg_rows(database_url, whatstracking.to_dollar_params(sql), *args)
    path = database_url[len("sqlite:///"):]
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------
# CLI commands
# ------------------------------------------------------------------------------------------------

async def test_migrate_prints_applied_versions_and_a_second_run_applies_nothing(
        tmp_path, database_url):
    first = cli_json("migrate", cwd=tmp_path, DATABASE_URL=database_url)
    assert first["applied"] == EVERY_MIGRATION
    assert first["latest"] == EVERY_MIGRATION[-1]
    second = cli_json("migrate", cwd=tmp_path, DATABASE_URL=database_url)
    assert second["applied"] == []
    assert second["latest"] == EVERY_MIGRATION[-1]


async def test_company_add_prints_secrets_and_a_duplicate_fails(tmp_path, database_url):
    created = cli_json("company", "add", "acme", "--name", "Acme Ltda", cwd=tmp_path,
                       DATABASE_URL=database_url)
    assert created["company_id"] == "acme"
    assert created["token"] and created["webhook_secret"]
    rows = await db_rows(database_url, "SELECT name FROM companies WHERE id = ?", "acme")
    assert rows == [{"name": "Acme Ltda"}]

    again = cli("company", "add", "acme", "--name", "Other", cwd=tmp_path,
                DATABASE_URL=database_url)
    assert again.returncode != 0
    assert again.stdout == ""
    assert "acme" in again.stderr and "exists" in again.stderr
    assert "Traceback" not in again.stderr
    rows = await db_rows(database_url, "SELECT name FROM companies WHERE id = ?", "acme")
    assert rows == [{"name": "Acme Ltda"}]


async def test_rollup_recounts_the_report_counters_after_visits_edited_by_hand(
        tmp_path, database_url):
    cli_json("migrate", cwd=tmp_path, DATABASE_URL=database_url)
    storage = whatstracking.Storage.from_url(database_url)
    await storage.connect()
    try:
        await storage.transact(lambda tx: tx.execute(
            "INSERT INTO visits (company_id, visitor_id, code, expires_at, utm_source, "
            "last_touch, first_touch, clicks, created_at, updated_at) VALUES "
            "('acme', 'v1', 'CODE1', 2e9, 'google', '{}', '{}', 1, 1767225600, 1767225600)"))
    finally:
        await storage.close()
    assert cli_json("rollup", cwd=tmp_path, DATABASE_URL=database_url) == {"rollup_rows": 5}
    rows = await db_rows(database_url, "SELECT value, visits, clicks FROM visit_rollup "
                         "WHERE dimension = 'utm_source'")
    assert rows == [{"value": "google", "visits": 1, "clicks": 1}]


@pytest.mark.parametrize("args,words", [
    (("company", "add", "bad id!"), "ID"),
    (("company", "add", "acme", "--evolution-url", "not-a-url"), "evolution_url"),
])
def test_company_add_bad_input_fails_readably(tmp_path, args, words):
    proc = cli(*args, cwd=tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'wt.db'}")
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


async def test_token_add_for_an_unknown_company_fails(tmp_path, database_url):
    proc = cli("token", "add", "ghost", cwd=tmp_path, DATABASE_URL=database_url)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "Company not found" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_company_list_token_list_and_token_revoke(tmp_path, database_url):
    assert cli_json("company", "list", cwd=tmp_path, DATABASE_URL=database_url) == {
        "companies": []}
    created = cli_json("company", "add", "acme", "--name", "Acme", cwd=tmp_path,
                       DATABASE_URL=database_url)
    cli_json("company", "add", "beta", cwd=tmp_path, DATABASE_URL=database_url)
    extra = cli_json("token", "add", "acme", "--name", "zapier", cwd=tmp_path,
                     DATABASE_URL=database_url)
    assert extra["name"] == "zapier" and isinstance(extra["id"], int)
    listed = cli_json("company", "list", cwd=tmp_path, DATABASE_URL=database_url)
    assert [(c["company_id"], c["name"], c["tokens"]) for c in listed["companies"]] == [
        ("acme", "Acme", 2), ("beta", "beta", 1)]
    assert all(c["created_at"].endswith("Z") for c in listed["companies"])

    tokens = cli_json("token", "list", "acme", cwd=tmp_path, DATABASE_URL=database_url)
    assert tokens["company_id"] == "acme"
    assert [(t["name"], t["last_used_at"]) for t in tokens["tokens"]] == [
        ("default", None), ("zapier", None)]
    assert created["token"] not in json.dumps(tokens) and extra["token"] not in json.dumps(tokens)

    revoked = cli_json("token", "revoke", "acme", str(extra["id"]), cwd=tmp_path,
                       DATABASE_URL=database_url)
    assert revoked == {"ok": True, "company_id": "acme", "id": extra["id"]}
    tokens = cli_json("token", "list", "acme", cwd=tmp_path, DATABASE_URL=database_url)
    assert [t["name"] for t in tokens["tokens"]] == ["default"]

    # Another company's token, an unknown one, an unknown company: one readable line each.
    beta = cli_json("token", "list", "beta", cwd=tmp_path, DATABASE_URL=database_url)
    for args, words in ((("token", "revoke", "acme", str(beta["tokens"][0]["id"])),
                         "Token not found"),
                        (("token", "revoke", "acme", str(extra["id"])), "Token not found"),
                        (("token", "revoke", "acme", "x1"), "TOKEN_ID"),
                        (("token", "revoke", "ghost", "1"), "Company not found"),
                        (("token", "list", "ghost"), "Company not found")):
        proc = cli(*args, cwd=tmp_path, DATABASE_URL=database_url)
        assert proc.returncode != 0, args
        assert proc.stdout == ""
        assert words in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
        assert len(proc.stderr.strip().splitlines()) <= 2  # (the database line,) the error
    assert len(cli_json("token", "list", "beta", cwd=tmp_path,
                        DATABASE_URL=database_url)["tokens"]) == 1


async def test_a_token_revoked_by_the_cli_is_refused_at_once_by_a_running_server(
        tmp_path, database_url, servers):
    cli_json("company", "add", "acme", cwd=tmp_path, DATABASE_URL=database_url)
    extra = cli_json("token", "add", "acme", cwd=tmp_path, DATABASE_URL=database_url)
    server = servers(tmp_path, DATABASE_URL=database_url)
    auth = {"Authorization": f"Bearer {extra['token']}"}
    assert http("GET", server.url("/api/company"), headers=auth)[0] == 200
    tokens = cli_json("token", "list", "acme", cwd=tmp_path, DATABASE_URL=database_url)
    used = {t["id"]: t["last_used_at"] for t in tokens["tokens"]}
    assert used[extra["id"]] is not None  # the server recorded its use
    cli_json("token", "revoke", "acme", str(extra["id"]), cwd=tmp_path,
             DATABASE_URL=database_url)
    assert http("GET", server.url("/api/company"), headers=auth) == (
        401, {"error": "Unauthorized"})
    assert server.stop() == 0


async def test_cli_tokens_authenticate_against_a_running_server(tmp_path, database_url, servers):
    created = cli_json("company", "add", "acme", "--name", "Acme", cwd=tmp_path,
                       DATABASE_URL=database_url)
    extra = cli_json("token", "add", "acme", "--name", "zapier", cwd=tmp_path,
                     DATABASE_URL=database_url)
    assert extra["token"] and extra["token"] != created["token"]

    server = servers(tmp_path, DATABASE_URL=database_url)
    for token in (created["token"], extra["token"]):
        status, data = http("GET", server.url("/api/company"),
                            headers={"Authorization": f"Bearer {token}"})
        assert status == 200, data
        assert data["company_id"] == "acme"
        assert data["name"] == "Acme"
    # A token made while the server runs works at once, without a restart.
    later = cli_json("token", "add", "acme", cwd=tmp_path, DATABASE_URL=database_url)
    status, data = http("GET", server.url("/api/company"),
                        headers={"Authorization": f"Bearer {later['token']}"})
    assert status == 200 and data["company_id"] == "acme"
    status, data = http("GET", server.url("/api/company"),
                        headers={"Authorization": "Bearer wt_made-up"})
    assert (status, data) == (401, {"error": "Unauthorized"})
    assert server.stop() == 0


def test_unknown_command_fails(tmp_path):
    proc = cli("frobnicate", cwd=tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'wt.db'}")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# Configuration: .env and bad settings
# ------------------------------------------------------------------------------------------------

def test_dotenv_in_the_working_directory_is_read(tmp_path, program):
    (tmp_path / ".env").write_text("DATABASE_URL=sqlite:///from-dotenv.db\n")
    cli_json("migrate", cwd=tmp_path, script=program)
    # A relative SQLite path is beside the program, wherever it is started from.
    assert (program.parent / "from-dotenv.db").exists()
    assert not (program.parent / "whatstracking.db").exists()
    assert not list(tmp_path.glob("*.db"))


def test_real_environment_wins_over_dotenv(tmp_path, program):
    (tmp_path / ".env").write_text("DATABASE_URL=sqlite:///from-dotenv.db\nLOG_FORMAT=xml\n")
    # .env alone: its bad LOG_FORMAT is refused, which shows it was read.
    proc = cli("migrate", cwd=tmp_path, script=program)
    assert proc.returncode != 0
    assert "LOG_FORMAT" in proc.stderr
    # The real environment overrides both values.
    cli_json("migrate", cwd=tmp_path, script=program, DATABASE_URL="sqlite:///from-env.db",
             LOG_FORMAT="json")
    assert (program.parent / "from-env.db").exists()
    assert not (program.parent / "from-dotenv.db").exists()


def test_dotenv_beside_the_program_is_read_from_any_working_directory(tmp_path, program):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (program.parent / ".env").write_text("DATABASE_URL=sqlite:///beside.db\n")
    proc = cli("migrate", cwd=elsewhere, script=program)
    assert proc.returncode == 0, proc.stderr
    assert (program.parent / "beside.db").exists()
    assert not list(elsewhere.iterdir())
    assert f"database: sqlite:///{program.parent / 'beside.db'}" in proc.stderr.splitlines()


def test_working_directory_dotenv_wins_over_the_one_beside_the_program(tmp_path, program):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (program.parent / ".env").write_text("DATABASE_URL=sqlite:///beside.db\nLOG_FORMAT=xml\n")
    (elsewhere / ".env").write_text("DATABASE_URL=sqlite:///here.db\n")
    # Each file fills what the other leaves unset: the bad LOG_FORMAT comes from beside.
    proc = cli("migrate", cwd=elsewhere, script=program)
    assert proc.returncode != 0 and "LOG_FORMAT" in proc.stderr
    (program.parent / ".env").write_text("DATABASE_URL=sqlite:///beside.db\n")
    cli_json("migrate", cwd=elsewhere, script=program)
    assert (program.parent / "here.db").exists()
    assert not (program.parent / "beside.db").exists()


async def test_every_command_names_its_database_on_stderr_never_a_password(tmp_path,
                                                                           database_url):
    if database_url.startswith("postgres"):  # the test server trusts 127.0.0.1: any password
        url = database_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")
        named = "database: postgresql://postgres@127.0.0.1:5432/test"
    else:
        url, named = database_url, f"database: {database_url}"
    for command in (("migrate",), ("company", "add", "acme"), ("token", "add", "acme"),
                    ("rollup",), ("token", "add", "nobody-here")):
        proc = cli(*command, cwd=tmp_path, DATABASE_URL=url)
        assert named in proc.stderr.splitlines(), (command, proc.stderr)
        assert "s3cret" not in proc.stderr + proc.stdout
    assert "Company not found" in proc.stderr  # the last one failed, naming where it looked


def test_a_token_made_from_another_directory_lands_in_the_servers_database(tmp_path, program,
                                                                          servers):
    """The newcomer's case: the server runs from the program's directory, the CLI from home."""
    home = tmp_path / "home"
    home.mkdir()
    server = servers(program.parent, script=program)
    created = cli_json("company", "add", "acme", cwd=home, script=program)
    assert not list(home.iterdir())
    status, data = http("GET", server.url("/api/company"),
                        headers={"Authorization": f"Bearer {created['token']}"})
    assert (status, data["company_id"]) == (200, "acme")
    assert f"database: sqlite:///{program.parent / 'whatstracking.db'}" in server.log
    assert server.stop() == 0


def test_a_database_left_in_the_working_directory_is_still_used_with_a_warning(tmp_path,
                                                                                program):
    old = tmp_path / "old"
    old.mkdir()
    cli_json("company", "add", "acme", cwd=old, script=program,
             DATABASE_URL=f"sqlite:///{old / 'whatstracking.db'}")
    proc = cli("token", "add", "acme", cwd=old, script=program)
    assert proc.returncode == 0, proc.stderr
    assert "working directory" in proc.stderr and "absolute path" in proc.stderr
    assert f"database: sqlite:///{old / 'whatstracking.db'}" in proc.stderr.splitlines()
    assert not (program.parent / "whatstracking.db").exists()


@pytest.mark.parametrize("env,name", [
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"PORT": "eighty"}, "PORT"),
    ({"DATABASE_URL": "mysql://u@h/db"}, "DATABASE_URL"),
    ({"DATABASE_URL": "sqlite:///:memory:"}, "DATABASE_URL"),
    ({"TRUST_PROXY": "perhaps"}, "TRUST_PROXY"),
])
@pytest.mark.parametrize("command", [(), ("migrate",), ("company", "add", "acme")])
def test_bad_setting_exits_with_one_readable_sentence(tmp_path, env, name, command):
    proc = cli(*command, cwd=tmp_path, **env)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert name in lines[0]
    assert lines[0].rstrip().endswith(".")


@pytest.mark.parametrize("command", [(), ("migrate",), ("token", "add", "acme")])
def test_unreachable_database_exits_with_one_readable_sentence(tmp_path, command):
    (tmp_path / "a-file").write_text("not a directory")
    for url in (f"sqlite:///{tmp_path / 'a-file' / 'wt.db'}",
                "postgresql://postgres:s3cret@127.0.0.1:1/nowhere"):
        proc = cli(*command, cwd=tmp_path, DATABASE_URL=url, PORT=str(free_port()))
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "DATABASE_URL" in lines[0]
        assert "s3cret" not in proc.stderr


# Runs the CLI as the user `nobody`, as the systemd unit's dedicated user would be (root writes
# anywhere, so a directory without write permission proves nothing to it). The modules are
# imported first, while still root: the interpreter lives under /root.
AS_NOBODY = """
import os, sys
sys.path.insert(0, sys.argv.pop(1))
import concurrent.futures.thread, aiosqlite, asyncpg, dotenv, rjsmin, whatstracking
if os.geteuid() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(whatstracking.main(sys.argv[1:]))
"""


def others_may_read(path: Path) -> bool:
    """Whether a user with no rights of its own (nobody) may read `path`: every directory on
    the way may be searched by others, and the file read."""
    path = path.resolve()
    for part in [*reversed(path.parents), path]:
        mode = part.stat().st_mode
        if part.is_dir() and not mode & 0o001 or not part.is_dir() and not mode & 0o004:
            return False
    return True


@pytest.fixture
def root_owned_dir():
    """A directory under /tmp that only root may write (and `nobody` may enter)."""
    # The program's modules load lazily as nobody too: a checkout (or venv) under a private
    # directory such as /root cannot be read by nobody at all, so the case cannot be run there.
    for needed in (Path(SCRIPT), Path(sys.prefix) / "pyvenv.cfg"):
        if os.geteuid() == 0 and needed.exists() and not others_may_read(needed):
            pytest.skip(f"user nobody cannot read {needed} (a private parent directory)")
    base = Path(tempfile.mkdtemp(prefix="wt-perm-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("blocked", ["directory", "file"])
@pytest.mark.parametrize("command", [(), ("migrate",), ("company", "add", "acme")])
def test_a_database_the_user_cannot_write_says_permission_denied_with_the_path(
        root_owned_dir, blocked, command):
    if blocked == "directory":  # nobody may not create a file there
        target = root_owned_dir / "locked" / "wt.db"
        target.parent.mkdir(mode=0o755)
        if os.geteuid() != 0:
            os.chmod(target.parent, 0o555)
    else:  # the file exists but belongs to root
        target = root_owned_dir / "wt.db"
        sqlite3.connect(target).close()
        os.chmod(target, 0o600 if os.geteuid() == 0 else 0o400)
    proc = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, str(Path(SCRIPT).parent), *command],
        cwd=root_owned_dir, capture_output=True, text=True, timeout=60,
        env=clean_env(DATABASE_URL=f"sqlite:///{target}", PORT=str(free_port()),
                      HOST="127.0.0.1"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "permission denied" in lines[0]
    assert str(target if blocked == "file" else target.parent) in lines[0]
    assert "listening" not in proc.stderr


def db_files_modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}


async def test_the_sqlite_database_and_its_wal_and_shm_are_created_owner_only(tmp_path):
    old = os.umask(0)  # the mode must not depend on a careful umask
    try:
        storage = whatstracking.Storage.from_url(f"sqlite:///{tmp_path / 'new' / 'wt.db'}")
        await storage.connect()
    finally:
        os.umask(old)
    try:
        await storage.migrate()  # writes: the -wal and -shm files exist while it is open
        assert db_files_modes(tmp_path / "new") == {
            "wt.db": 0o600, "wt.db-wal": 0o600, "wt.db-shm": 0o600}
    finally:
        await storage.close()


def test_a_database_made_by_the_cli_is_owner_only(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "company", "add", "acme"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.umask(0),
                          env=clean_env(DATABASE_URL=f"sqlite:///{tmp_path / 'db' / 'wt.db'}"))
    assert proc.returncode == 0, proc.stderr
    assert db_files_modes(tmp_path / "db")["wt.db"] == 0o600


# ------------------------------------------------------------------------------------------------
# serve
# ------------------------------------------------------------------------------------------------

async def test_serve_answers_healthz_hints_on_a_fresh_db_and_stops_on_sigterm(
        tmp_path, database_url, servers):
    server = servers(tmp_path, DATABASE_URL=database_url)
    status, data = http("GET", server.url("/healthz"))
    assert status == 200 and data["ok"] is True
    status, data = http("GET", server.url("/readyz"))
    assert status == 200
    assert data["database"] == ("postgres" if database_url.startswith("postgres") else "sqlite")
    assert "No company yet" in server.log
    assert "company add" in server.log and "/dashboard" in server.log
    assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in server.log


async def test_serve_gives_no_hint_once_a_company_exists(tmp_path, database_url, servers):
    cli_json("company", "add", "acme", cwd=tmp_path, DATABASE_URL=database_url)
    server = servers(tmp_path, DATABASE_URL=database_url)
    assert "No company yet" not in server.log
    assert server.stop() == 0


def test_serve_defaults_to_sqlite_beside_the_program(tmp_path, program, servers):
    server = servers(tmp_path, script=program)
    status, data = http("GET", server.url("/readyz"))
    assert status == 200 and data["database"] == "sqlite"
    assert (program.parent / "whatstracking.db").exists()
    assert not (tmp_path / "whatstracking.db").exists()
    assert server.stop() == 0


def test_a_port_in_use_or_a_bad_host_exits_with_one_sentence_and_claims_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for env, words in (({"HOST": "127.0.0.1", "PORT": port}, f"PORT {port} is already in use"),
                           ({"HOST": "1.2.3.4.5"}, "HOST '1.2.3.4.5'"),
                           ({"HOST": "192.0.2.123"}, "HOST 192.0.2.123 is not an address")):
            proc = cli(cwd=tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'wt.db'}",
                       **{"PORT": str(free_port()), **env})
            assert proc.returncode != 0
            assert "Traceback" not in proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1, proc.stderr  # nothing said "listening" before the failure
            assert words in lines[0] and lines[0].endswith(".")


def send_slowly(port: int, body: bytes) -> socket.socket:
    """A POST /tracking whose headers and first bytes of body have arrived, the rest not yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /tracking HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict, dict]:
    raw = b""
    while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < int(
            re.search(rb"Content-Length: (\d+)", raw).group(1)):
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {raw!r}"
        raw += chunk
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


async def test_sigterm_finishes_a_request_whose_body_is_still_arriving(tmp_path, database_url,
                                                                        servers):
    server = servers(tmp_path, DATABASE_URL=database_url)
    _create_company_over_http(server)
    body = json.dumps({"company_id": "acme", "visitor_id": "slow-visitor",
                       "page_url": "https://seusite.com/?utm_source=google"}).encode()
    sock = send_slowly(server.port, body)
    # Its handler runs once the server has read the headers: wait for that (the gauge counts
    # the metrics request too), not for a time.
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(urllib.request.Request(
                server.url("/metrics"), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})) as r:
            if "whatstracking_http_requests_in_flight 2" in r.read().decode().splitlines():
                break
        assert time.monotonic() < deadline, server.log
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while "Stopping" not in server.log:
        assert time.monotonic() < deadline, server.log
        time.sleep(0.02)
    assert "finishing 1 request(s) under way" in server.log
    with pytest.raises(OSError):  # no new connections once stopping
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    sock.sendall(body[10:])
    status, headers, answer = read_answer(sock)
    sock.close()
    assert status == 200, answer
    assert headers["Connection"] == "close"
    assert server.stop() == 0
    rows = await db_rows(database_url, "SELECT visitor_id FROM visits WHERE company_id = ?", "acme")
    assert rows == [{"visitor_id": "slow-visitor"}]
    assert "Traceback" not in server.log


# ------------------------------------------------------------------------------------------------
# Durability: what was acknowledged survives kill -9
# ------------------------------------------------------------------------------------------------

def _create_company_over_http(server: Server, company_id: str = "acme") -> dict:
    status, data = http("POST", server.url("/api/companies"), {"company_id": company_id,
                                                              "name": "Acme"},
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 201, data
    return data


async def test_acknowledged_tracking_survives_sigkill(tmp_path, database_url, servers):
    server = servers(tmp_path, DATABASE_URL=database_url)
    _create_company_over_http(server)
    acknowledged = []
    for n in range(12):
        status, data = http("POST", server.url("/tracking"), {
            "companie_id": "acme", "visitor_id": f"visitor-{n}",
            "page_url": f"https://seusite.com/p{n}?utm_source=google&utm_campaign=c{n}"})
        assert status == 200, data
        acknowledged.append((data["session_id"], data["code"], f"c{n}"))
    server.proc.kill()  # SIGKILL: no shutdown, no flush
    assert server.stop(timeout=30) == -signal.SIGKILL

    rows = await db_rows(database_url, "SELECT id, code, utm_campaign FROM visits "
                                       "WHERE company_id = ?", "acme")
    stored = {(r["id"], r["code"], r["utm_campaign"]) for r in rows}
    assert set(acknowledged) <= stored
    events = await db_rows(database_url, "SELECT visit_id FROM tracking_events "
                                         "WHERE company_id = ?", "acme")
    assert {session for session, _code, _c in acknowledged} <= {e["visit_id"] for e in events}
    assert len(events) == len(acknowledged)


async def test_acknowledged_webhook_delivery_survives_sigkill(tmp_path, database_url, servers):
    server = servers(tmp_path, DATABASE_URL=database_url)
    company = _create_company_over_http(server)
    status, visit = http("POST", server.url("/tracking"), {
        "company_id": "acme", "visitor_id": "visitor-1",
        "page_url": "https://seusite.com/?utm_source=google&utm_campaign=natal"})
    assert status == 200, visit
    acknowledged = {}
    texts = [f"Oi {whatstracking.message_code(visit['code'])}", "Oi, vi no Instagram",
             "Bom dia"]
    for n, text in enumerate(texts):
        message_id = uuid.uuid4().hex.upper()
        status, data = http("POST", server.url("/webhook/acme"),
                            upsert(text, phone=f"551190000{n:04d}", message_id=message_id),
                            headers={"X-Webhook-Secret": company["webhook_secret"]})
        assert status == 200, data
        assert data["lead_id"]
        acknowledged[data["lead_id"]] = message_id
    server.proc.send_signal(signal.SIGKILL)
    assert server.stop(timeout=30) == -signal.SIGKILL

    leads = await db_rows(database_url, "SELECT id, message_id, code, utm_campaign FROM leads "
                                        "WHERE company_id = ?", "acme")
    by_id = {r["id"]: r for r in leads}
    for lead_id, message_id in acknowledged.items():
        assert by_id[lead_id]["message_id"] == message_id
    coded = [r for r in leads if r["code"] == visit["code"]]
    assert len(coded) == 1 and coded[0]["utm_campaign"] == "natal"
    deliveries = await db_rows(database_url, "SELECT status FROM webhook_deliveries "
                                             "WHERE company_id = ?", "acme")
    assert [d["status"] for d in deliveries] == ["processed"] * len(texts)
