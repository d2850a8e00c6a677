"""The agent configuration file, and `deltaship-agent init`'s hook flags: real processes."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import AgentConfig, load_config, save_config
from edge_agent.hooks import Hook, Hooks, parse_hooks

from .conftest import Cli

AWKWARD = [
    'say "hi"', "C:\\models\\new", "two\nlines\r\n", "tab\there", "{version} at {path}",
    "'''", '"""', "# not a comment", "[hooks]", "a = b", "ünïcødé ✓ 🚀", "\x00\x01\x1f\x7f",
    "\\u0041 is not A", "", " ",
]


def _roundtrip(cfg: AgentConfig, path: Path) -> AgentConfig:
    save_config(cfg, path)
    return load_config(path)


def test_hooks_round_trip_with_awkward_strings(tmp_path: Path) -> None:
    notify: list[dict[str, object]] = [
        {"kind": "http", "url": f"http://127.0.0.1:8000/{s}", "method": "PUT", "body": s,
         "timeout": 2.5}
        for s in AWKWARD
    ]
    notify += [
        {"kind": "command", "argv": AWKWARD, "timeout": 1},
        {"kind": "signal", "pidfile": "/run/a \"b\"\\c.pid", "signal": "USR1"},
    ]
    hooks: dict[str, object] = {
        "notify": notify,
        "health": {"kind": "http", "url": "http://h/{version}", "expect_version": True,
                   "method": "HEAD", "body": "x\ny", "timeout": 0.25, "attempts": 7,
                   "interval": 1e-3},
    }
    cfg = AgentConfig(store='s3://b/"odd"\\prefix', model_dir=tmp_path / "m\nodel",
                      device_id="dev-1", include=("layers.*", "a\\b"), hooks=hooks)
    back = _roundtrip(cfg, tmp_path / "agent.toml")
    assert parse_hooks(back.hooks) == parse_hooks(hooks)
    assert dataclasses.replace(back, hooks=hooks) == cfg
    assert "[hooks]" in (tmp_path / "agent.toml").read_text()
    # Re-saving what was read (lists instead of tuples) changes nothing.
    again = _roundtrip(back, tmp_path / "again.toml")
    assert (tmp_path / "again.toml").read_text() == (tmp_path / "agent.toml").read_text()
    assert again == back


def test_no_hooks_no_table(tmp_path: Path) -> None:
    cfg = AgentConfig(store="/srv/store", model_dir=tmp_path / "m")
    back = _roundtrip(cfg, tmp_path / "agent.toml")
    assert back == cfg and back.hooks == {}
    assert "[hooks]" not in (tmp_path / "agent.toml").read_text()


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(), st.lists(st.text(min_size=1), min_size=1, max_size=4))
def test_any_text_round_trips(tmp_path: Path, text: str, argv: list[str]) -> None:
    hooks: dict[str, object] = {
        "notify": [{"kind": "http", "url": "http://x/" + text, "body": text}],
        "health": {"kind": "command", "argv": argv},
    }
    cfg = AgentConfig(store=text or "x", model_dir=tmp_path, device_id="dev-1", hooks=hooks)
    back = _roundtrip(cfg, tmp_path / "agent.toml")
    assert parse_hooks(back.hooks) == parse_hooks(hooks)
    assert dataclasses.replace(back, hooks=hooks) == cfg


# --- `deltaship-agent init` with hook flags ---------------------------------------------------


@pytest.fixture(scope="module")
def root_json(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trust root for a local-directory store (no S3 needed), made once for this module."""
    d = tmp_path_factory.mktemp("trust")
    cli = Cli(s3_endpoint, d)
    cli.publish("keygen", "--out", d / "keys", "--name", "release")
    (d / "store").mkdir()
    cli.publish("init", "--store", d / "store", "--key", d / "keys" / "release.key",
                "--out", d / "root.json")
    return d / "root.json"


def _init(cli: Cli, root: Path, *flags: object) -> subprocess.CompletedProcess[str]:
    return cli.run("deltaship-agent", "init", "--store", cli.cwd / "store", "--trust", root,
                   "--model-dir", cli.cwd / "dev", "--config", cli.cwd / "agent.toml",
                   "--device-id", "dev-1", *flags, check=False)


URL = "http://127.0.0.1:8000/v2/repository/models/m/load"
BODY = '{"version": "{version}", "path": "{path}", "quote": "\\"\'"}'
CASES = {
    "none": ([], Hooks()),
    "http notify with body": (
        ["--notify-http", URL, "--notify-http", URL + "?v={version}", "--notify-body", BODY],
        Hooks(notify=(Hook("http", url=URL, body=BODY),
                      Hook("http", url=URL + "?v={version}", body=BODY)))),
    "http notify without body": (
        ["--notify-http", URL], Hooks(notify=(Hook("http", url=URL),))),
    "command notify": (
        ["--notify-command", "systemctl reload 'model server' --at={path}",
         "--notify-command", r'/usr/bin/echo "a\"b" c\ d'],
        Hooks(notify=(Hook("command", argv=("systemctl", "reload", "model server", "--at={path}")),
                      Hook("command", argv=("/usr/bin/echo", 'a"b', "c d"))))),
    "signal notify": (
        ["--notify-signal", "/run/model-server.pid", "--notify-signal", "/run/b.pid:usr1",
         "--notify-signal", "/run/c.pid:SIGTERM"],
        Hooks(notify=(Hook("signal", pidfile="/run/model-server.pid", signal="HUP"),
                      Hook("signal", pidfile="/run/b.pid", signal="USR1"),
                      Hook("signal", pidfile="/run/c.pid", signal="TERM")))),
    "every notify kind, in order, with a timeout": (
        ["--notify-signal", "/run/s.pid", "--notify-command", "reload", "--notify-http", URL,
         "--hook-timeout", "2.5"],
        Hooks(notify=(Hook("http", url=URL, timeout=2.5),
                      Hook("command", argv=("reload",), timeout=2.5),
                      Hook("signal", pidfile="/run/s.pid", timeout=2.5)))),
    "http health": (
        ["--health-url", "http://127.0.0.1:8000/version", "--health-expect-version",
         "--health-timeout", "3", "--health-attempts", "4", "--health-interval", "0.5"],
        Hooks(health=Hook("http", url="http://127.0.0.1:8000/version", method="GET",
                          expect_version=True, timeout=3, attempts=4, interval=0.5))),
    "command health with defaults": (
        ["--health-command", "check-model --version {version}"],
        Hooks(health=Hook("command", argv=("check-model", "--version", "{version}"),
                          method="GET", timeout=5, attempts=10, interval=1))),
}


@pytest.mark.parametrize("flags,expected", CASES.values(), ids=CASES.keys())
def test_init_flags(cli: Cli, root_json: Path, flags: list[str], expected: Hooks) -> None:
    p = _init(cli, root_json, *flags)
    assert p.returncode == 0, p.stderr
    cfg = load_config(cli.cwd / "agent.toml")
    assert parse_hooks(cfg.hooks) == expected
    # A configuration written by init and saved again keeps its hooks.
    save_config(cfg, cli.cwd / "again.toml")
    assert parse_hooks(load_config(cli.cwd / "again.toml").hooks) == expected


def test_relative_pidfile_is_made_absolute(cli: Cli, root_json: Path) -> None:
    assert _init(cli, root_json, "--notify-signal", "run/server.pid:INT").returncode == 0
    hooks = parse_hooks(load_config(cli.cwd / "agent.toml").hooks)
    assert hooks.notify == (Hook("signal", pidfile=str(cli.cwd / "run/server.pid"),
                                 signal="INT"),)


ERRORS = {
    "two health checks": (["--health-url", URL, "--health-command", "true"], "exclude each other"),
    "unknown signal": (["--notify-signal", "/run/x.pid:NOPE"], "--notify-signal"),
    "signal number": (["--notify-signal", "/run/x.pid:9"], "--notify-signal"),
    "empty signal": (["--notify-signal", "/run/x.pid:"], "--notify-signal"),
    "no pidfile": (["--notify-signal", ":HUP"], "--notify-signal"),
    "unclosed quote": (["--notify-command", "reload 'model"], "--notify-command"),
    "empty command": (["--health-command", "  "], "--health-command"),
    "not an http url": (["--notify-http", "ftp://host/x"], "--notify-http"),
    "body without url": (["--notify-body", "{}"], "--notify-body needs --notify-http"),
    "expect version of a command": (
        ["--health-command", "true", "--health-expect-version"], "needs --health-url"),
    "health timing without check": (["--health-attempts", "3"], "--health-attempts needs"),
    "hook timeout without hooks": (["--hook-timeout", "3"], "--hook-timeout needs"),
}


@pytest.mark.parametrize("flags,message", ERRORS.values(), ids=ERRORS.keys())
def test_init_flag_errors_are_one_line(cli: Cli, root_json: Path, flags: list[str],
                                       message: str) -> None:
    p = _init(cli, root_json, *flags)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("deltaship-agent: error: ") and message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (cli.cwd / "agent.toml").exists() and not (cli.cwd / "dev").exists()


# --- the rule table --------------------------------------------------------------------------


def test_every_setting_has_a_rule() -> None:
    """A new AgentConfig field needs its line in edge_agent.config.RULES (type and range)."""
    from edge_agent.config import RULES

    assert set(RULES) == {f.name for f in dataclasses.fields(AgentConfig)}


def test_defaults_pass_the_rules(tmp_path: Path) -> None:
    from edge_agent.config import check_config

    cfg = AgentConfig(store="/srv/store", model_dir=tmp_path / "m")
    assert check_config(cfg) == cfg


@pytest.mark.parametrize("line,needle", [
    ('interval = "fast"', 'interval = "fast"'),
    ("keep = -1", "keep = -1"),
    ('include = "layers.0.*"', "include"),
    ("expiry_grace = 1e12", "expiry_grace"),
    ("downloads = 1000", "downloads = 1000"),
])
def test_load_config_names_the_wrong_setting(tmp_path: Path, line: str, needle: str) -> None:
    from manifest.errors import LocalError

    path = tmp_path / "agent.toml"
    path.write_text(f'store = "/srv/store"\nmodel_dir = "/m"\n{line}\n')
    with pytest.raises(LocalError) as e:
        load_config(path)
    assert str(path) in str(e.value) and needle in str(e.value)
    assert "\n" not in str(e.value)
