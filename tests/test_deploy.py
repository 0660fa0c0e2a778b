"""deploy/ and the README's commands: the systemd unit has what a stock VPS install needs, the
settings the install guide writes exist, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def unit_directives() -> dict[str, list[str]]:
    """KEY → [values] of deploy/whatstracking.service (comments left out)."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "whatstracking.service").read_text("utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def example_env_keys() -> set[str]:
    """The variables config.example.env sets (its uncommented KEY=value lines)."""
    return {m.group(1) for m in re.finditer(r"^([A-Z][A-Z0-9_]*)=", (
        ROOT / "config.example.env").read_text("utf-8"), re.M)}


def install_env_block() -> tuple[str, list[str]]:
    """The env file INSTALL.md writes with `sudo tee <path> <<'EOF'`: its path and keys."""
    text = (DEPLOY / "INSTALL.md").read_text("utf-8")
    match = re.search(r"sudo tee (\S+) >/dev/null <<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert match, "INSTALL.md has no env file heredoc"
    keys = [line.split("=", 1)[0] for line in match.group(2).splitlines() if "=" in line]
    return match.group(1), keys


def readme_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text("utf-8"), re.S)


def test_unit_runs_the_venv_python_as_its_own_user_with_hardening():
    unit = unit_directives()
    assert unit["User"] == ["whatstracking"]
    assert unit["WorkingDirectory"] == ["/opt/whatstracking"]
    assert unit["ExecStart"][0].startswith("/opt/whatstracking/.venv/bin/python ")
    assert unit["StateDirectory"] == ["whatstracking"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("Restart", "on-failure")):
        assert unit[key] == [value], key
    # Longer than the server's own shutdown (requests under way, then the delivery in flight).
    assert int(unit["TimeoutStopSec"][0]) > 30
    assert unit["WantedBy"] == ["multi-user.target"]


def test_unit_keeps_the_database_in_its_state_directory_and_listens_on_loopback():
    env = dict(v.split("=", 1) for v in unit_directives()["Environment"])
    assert env["DATABASE_URL"] == "sqlite:////var/lib/whatstracking/whatstracking.db"
    assert env["HOST"] == "127.0.0.1"


def test_settings_the_guide_and_unit_write_are_real_variables():
    path, keys = install_env_block()
    assert unit_directives()["EnvironmentFile"] == [path]
    assert {"PUBLIC_URL", "HOST", "DATABASE_URL"} <= set(keys)
    unit_keys = {v.split("=", 1)[0] for v in unit_directives()["Environment"]} - {
        "PYTHONUNBUFFERED"}
    unknown = (set(keys) | unit_keys) - example_env_keys()
    assert not unknown, f"not in config.example.env: {sorted(unknown)}"


def test_proxy_examples_keep_metrics_private_and_proxy_to_loopback():
    caddy = (DEPLOY / "Caddyfile").read_text("utf-8")
    assert re.search(r"^\s*reverse_proxy 127\.0\.0\.1:8080$", caddy, re.M)
    assert re.search(r"@metrics path /metrics", caddy) and "respond @metrics" in caddy
    nginx = (DEPLOY / "nginx.conf").read_text("utf-8")
    assert "server 127.0.0.1:8080;" in nginx
    assert re.search(r"location = /metrics \{\s*return 404;", nginx)
    assert "proxy_set_header X-Forwarded-For" in nginx


def test_ci_runs_the_readme_test_command_in_a_venv():
    test_command = next(b.strip() for b in readme_blocks() if "pytest" in b)
    assert test_command.startswith("python3 -m venv .venv && ")
    assert test_command in (ROOT / ".ci" / "run").read_text("utf-8").splitlines()


def test_readme_commands_use_the_venv_python():
    """A stock Debian has no `python` and refuses system-wide pip installs."""
    inline = re.findall(r"`([^`\n]+)`", (ROOT / "README.md").read_text("utf-8"))
    for doc in ("README.md", "docs/performance.md"):
        inline += re.findall(r"`([^`\n]+)`", (ROOT / doc).read_text("utf-8"))
    lines = [line for block in readme_blocks() for line in block.splitlines()]
    for line in lines + inline:
        assert not re.search(r"(^|[\s;&|(])(python|pip) ", line), line
        assert not re.search(r"(^|[\s;&|(])python3 (?!-m venv)", line), line
