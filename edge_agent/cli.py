"""``deltaship-agent``: keep a device's model at the release its trusted manifest names.

Maps flags and the TOML configuration onto :class:`edge_agent.config.AgentConfig`, runs the
update loop, and turns every :class:`manifest.errors.DeltashipError` into one line on stderr
and its exit code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
from click.core import ParameterSource

from manifest.cli_errors import exit_on_errors
from manifest.errors import DeltashipError, HookError, LocalError, NotFoundError
from manifest.metadata import format_time
from manifest.storage.atomic import write_atomic
from manifest.trust import verify_root

from .config import AgentConfig, default_config_path, load_config, save_config
from .hooks import parse_hooks
from .lock import model_dir_lock
from .state import load_state, rollback_target, save_state
from .updater import Agent, run_forever

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES = """\b
Exit codes: 0 success (or up to date); 1 other error; 2 bad local input or configuration;
3 the store sent data that failed verification (nothing was installed); 4 the store could not
be reached; 5 another process changed the same thing; 6 a hook or the health check failed after
a switch (after an update the agent switched back to the previous version; after a rollback the
rollback stands). The live model is never touched by a failed update."""


_errors = exit_on_errors("deltaship-agent")


_config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="DELTASHIP_AGENT_CONFIG",
    help="Agent configuration file [default: /etc/deltaship/agent.toml as root, else "
    "~/.config/deltaship/agent.toml; env: DELTASHIP_AGENT_CONFIG].",
)


def _load(config_path: Path | None) -> AgentConfig:
    return load_config(config_path or default_config_path())


def _device_id(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        mid = Path("/etc/machine-id").read_text().strip()
        if mid:
            return mid
    except OSError:
        pass
    return uuid.uuid4().hex


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="deltaship")
def main() -> None:
    """Keep this device's model at the release its trusted manifest names.

    \b
    Typical use:
      deltaship-agent init --store s3://models/llm --trust root.json --model-dir /var/lib/model
      deltaship-agent run            # the service (see scripts/deltaship-agent.service)
      deltaship-agent status
      deltaship-agent rollback       # back to the previous version, pinned
      deltaship-agent resume         # follow the store again

    Serving code loads MODEL_DIR/current (a symlink switched atomically).
    """


def _hooks_from_flags(notify_http: tuple[str, ...], notify_body: str | None,
                      notify_command: tuple[str, ...], notify_signal: tuple[str, ...],
                      hook_timeout: float, health_url: str | None, health_command: str | None,
                      health_expect_version: bool, health_timeout: float, health_attempts: int,
                      health_interval: float) -> dict[str, object]:
    """The ``[hooks]`` table that init's --notify-* and --health-* flags describe, validated."""

    def url(flag: str, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise LocalError(f"{flag} {value!r}: not an http:// or https:// URL")
        return value

    def argv(flag: str, value: str) -> list[str]:
        try:
            words = shlex.split(value)
        except ValueError as e:
            raise LocalError(f"{flag} {value!r}: {e}") from e
        if not words:
            raise LocalError(f"{flag}: the command is empty")
        return words

    def signal_hook(value: str) -> dict[str, object]:
        pidfile, _, name = value.rpartition(":") if ":" in value else (value, "", "HUP")
        name = name.upper().removeprefix("SIG")
        if not pidfile or f"SIG{name}" not in signal.Signals.__members__:
            raise LocalError(f"--notify-signal {value!r}: expected PIDFILE or PIDFILE:SIGNAL "
                             "with a signal name such as HUP or USR1")
        return {"kind": "signal", "pidfile": str(Path(pidfile).absolute()), "signal": name,
                "timeout": hook_timeout}

    ctx = click.get_current_context()
    given = {p for p in ("hook_timeout", "health_timeout", "health_attempts", "health_interval")
             if ctx.get_parameter_source(p) is not ParameterSource.DEFAULT}
    has_health = health_url is not None or health_command is not None
    if health_url is not None and health_command is not None:
        raise LocalError("--health-url and --health-command exclude each other: choose one")
    if notify_body is not None and not notify_http:
        raise LocalError("--notify-body needs --notify-http")
    if health_expect_version and health_url is None:
        raise LocalError("--health-expect-version needs --health-url")
    if given - {"hook_timeout"} and not has_health:
        flag = sorted(given - {"hook_timeout"})[0].replace("_", "-")
        raise LocalError(f"--{flag} needs --health-url or --health-command")
    if "hook_timeout" in given and not (notify_http or notify_command or notify_signal):
        raise LocalError("--hook-timeout needs --notify-http, --notify-command or --notify-signal")

    body = {"body": notify_body} if notify_body else {}
    notify: list[dict[str, object]] = [
        *({"kind": "http", "url": url("--notify-http", u), **body, "timeout": hook_timeout}
          for u in notify_http),
        *({"kind": "command", "argv": argv("--notify-command", c), "timeout": hook_timeout}
          for c in notify_command),
        *(signal_hook(s) for s in notify_signal),
    ]
    table: dict[str, object] = {"notify": notify} if notify else {}
    check = {"timeout": health_timeout, "attempts": health_attempts, "interval": health_interval}
    if health_url is not None:
        expect = {"expect_version": True} if health_expect_version else {}
        table["health"] = {"kind": "http", "url": url("--health-url", health_url), **expect,
                           **check}
    elif health_command is not None:
        table["health"] = {"kind": "command", "argv": argv("--health-command", health_command),
                           **check}
    parse_hooks(table)
    return table


@main.command()
@click.option("--store", required=True, metavar="URL",
              help="s3://BUCKET/PREFIX, https://HOST/PREFIX, http://..., file:///PATH or a path.")
@click.option("--trust", "trust", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The trust root (root.json) to pin, from `deltaship-publish init`.")
@click.option("--model-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where versions live; serving code loads MODEL_DIR/current.")
@click.option("--device-id", help="Default: /etc/machine-id, else a generated id.")
@click.option("--interval", default=300.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds between polls (with random jitter).")
@click.option("--include", multiple=True, metavar="PATTERN",
              help="Only these groups (shell pattern on group names, e.g. 'layers.3.experts.*');"
              " repeat for several.")
@click.option("--endpoint-url", metavar="URL", help="S3 endpoint (MinIO, Ceph, R2, ...).")
@click.option("--max-rate", type=click.FloatRange(min=1), metavar="BYTES/S",
              help="Bandwidth cap for downloads.")
@click.option("--keep", default=2, show_default=True, type=click.IntRange(min=0),
              help="Previous versions kept for rollback.")
@click.option("--expiry-grace", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds an expired manifest is still accepted (devices with bad clocks).")
@click.option("--notify-http", multiple=True, metavar="URL",
              help="After each switch, POST to URL; {version} and {path} (the new version's "
              "directory) are replaced in it. An answer other than 2xx is a failure. Repeat for "
              "several.")
@click.option("--notify-body", metavar="TEMPLATE",
              help="Body of every --notify-http request, with {version} and {path} replaced, "
              "e.g. '{\"version\": \"{version}\"}'. Default: no body.")
@click.option("--notify-command", multiple=True, metavar="CMD",
              help="After each switch, run CMD, split into words as a shell would (no shell runs "
              "it); {version} and {path} are replaced in every word and DELTASHIP_VERSION and "
              "DELTASHIP_PATH are set. A non-zero exit is a failure. Repeat for several.")
@click.option("--notify-signal", multiple=True, metavar="PIDFILE[:SIGNAL]",
              help="After each switch, send SIGNAL (a name such as HUP or USR1; default HUP) to "
              "the process whose id PIDFILE holds. Repeat for several.")
@click.option("--hook-timeout", default=10.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0, min_open=True),
              help="Time limit of each --notify-* hook; a hook that takes longer has failed.")
@click.option("--health-url", metavar="URL",
              help="After the notify hooks, GET URL ({version} and {path} replaced); the new "
              "version is healthy once it answers 2xx.")
@click.option("--health-command", metavar="CMD",
              help="Instead of --health-url, run CMD (split and filled in as for "
              "--notify-command); the new version is healthy once it exits 0.")
@click.option("--health-expect-version", is_flag=True,
              help="The --health-url answer must also contain the new version's name (a server "
              "still serving the old version is not healthy).")
@click.option("--health-timeout", default=5.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0, min_open=True),
              help="Time limit of each health-check attempt.")
@click.option("--health-attempts", default=10, show_default=True, metavar="N",
              type=click.IntRange(min=1),
              help="Health-check attempts before the new version is declared unhealthy.")
@click.option("--health-interval", default=1.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0),
              help="Pause between health-check attempts.")
@_config_option
@_errors
def init(store: str, trust: Path, model_dir: Path, device_id: str | None, interval: float,
         include: tuple[str, ...], endpoint_url: str | None, max_rate: float | None, keep: int,
         expiry_grace: float, config_path: Path | None, **hook_flags: Any) -> None:
    """Write the agent configuration and pin the trust root.

    After each switch the agent can tell the model server (--notify-*: HTTP requests, then
    commands, then signals) and then check that it is healthy (--health-*). If a hook or the
    check fails, the agent switches back to the previous version (`run --once` exits 6) and does
    not retry the failed one until a newer release or `deltaship-agent resume`. For what these
    flags do not cover (another order or method, a timeout per hook), edit the [hooks] table of
    the configuration file.
    """
    hooks = _hooks_from_flags(**hook_flags)
    try:
        root_bytes = trust.read_bytes()
    except OSError as e:
        raise LocalError(f"cannot read the trust root {trust}: {e.strerror}") from e
    verify_root(root_bytes, now=datetime.now(UTC))
    model_dir = model_dir.absolute()
    cfg = AgentConfig(store=store, model_dir=model_dir, device_id=_device_id(device_id),
                      interval=interval, include=include, endpoint_url=endpoint_url,
                      max_rate=max_rate, keep=keep, expiry_grace=expiry_grace, hooks=hooks)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(cfg.trust_path, root_bytes)
    path = config_path or default_config_path()
    save_config(cfg, path)
    state = load_state(cfg.state_dir / "state.json")
    state.device_id = cfg.device_id
    save_state(state, cfg.state_dir / "state.json")
    click.echo(f"configuration written to {path}\ntrust root pinned at {cfg.trust_path}\n"
               f"device id {cfg.device_id}; start with `deltaship-agent run`")


@main.command()
@click.option("--once", is_flag=True, help="One update cycle, then exit (0 when up to date).")
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
@_config_option
@_errors
def run(once: bool, verbose: bool, config_path: Path | None) -> None:
    """Poll the store and apply updates until stopped (SIGTERM/SIGINT stop it cleanly)."""
    logging.basicConfig(level=logging.INFO if verbose or not once else logging.WARNING,
                        format="%(asctime)s deltaship-agent: %(message)s", stream=sys.stderr)
    cfg = _load(config_path)
    code = asyncio.run(run_forever(cfg, once=once))
    if once:
        state = load_state(cfg.state_dir / "state.json")
        click.echo(state.last_result or "")
    sys.exit(code)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_config_option
@_errors
def status(as_json: bool, config_path: Path | None) -> None:
    """Current and retained versions, pin, failed versions, last check and error, the plan in
    progress and what the last update downloaded."""
    cfg = _load(config_path)
    agent = Agent(cfg)
    state = load_state(agent.state_path)
    info: dict[str, Any] = {
        "device_id": state.device_id or cfg.device_id,
        "current": agent.layout.current() if agent.layout.current_link.exists() else None,
        "retained": agent.layout.retained() if agent.layout.versions.is_dir() else [],
        "pinned": state.pinned,
        "failed_versions": state.failed_versions,
        "highest_sequence": state.highest_sequence,
        "last_check": state.last_check,
        "last_result": state.last_result,
        "last_error": state.last_error,
        "bytes_last_update": state.bytes_last_update,
        "bytes_total": state.bytes_total,
        "plan": state.plan,
        "last_update": state.last_update,
        "store": cfg.store,
        "model_dir": str(cfg.model_dir),
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    plan = info["plan"]
    if plan:
        info["plan"] = (f"{plan['version']}: {plan['download_bytes']} bytes to download "
                        f"(full {plan['full_bytes']})")
    last = info["last_update"]
    if last:
        info["last_update"] = (
            f"{last.get('from') or 'nothing'} -> {last.get('version')} at {last.get('at')}: "
            f"{last.get('downloaded_bytes', 0)} bytes downloaded (full "
            f"{last.get('full_bytes', 0)}), {last.get('groups_changed', 0)} of "
            f"{last.get('groups', 0)} groups changed")
    for k, v in info.items():
        click.echo(f"{k.replace('_', ' '):<18} {v if v not in (None, []) else '-'}")


@main.command()
@click.option("--to", "to_version",
              help="Retained version to switch to [default: the version that was live before "
              "the current one (repeat to go further back), skipping versions that failed "
              "their health check].")
@_config_option
@_errors
def rollback(to_version: str | None, config_path: Path | None) -> None:
    """Switch to a retained version (re-verified) and pin the device there; works offline."""
    cfg = _load(config_path)
    with model_dir_lock(cfg.state_dir):
        _rollback(cfg, to_version)


def _notify_server(agent: Agent, version: str, done: str) -> None:
    """Run the hooks and health check for ``version``, which stays live either way."""
    try:
        asyncio.run(agent.hooks.after_switch(version, agent.layout.version_dir(version)))
    except HookError as e:
        raise HookError(f"{done}, but the model server is not healthy on it: {e}") from e


def _rollback(cfg: AgentConfig, to_version: str | None) -> None:
    agent = Agent(cfg)
    state = load_state(agent.state_path)
    current = agent.layout.current()
    if to_version is None:
        to_version = rollback_target(state, current, agent.layout.has_version)
        if to_version is None:
            raise NotFoundError("no previous version is retained on this device")
    if not agent.layout.has_version(to_version):
        raise NotFoundError(f"version {to_version} is not retained on this device "
                            f"(retained: {', '.join(agent.layout.retained()) or 'none'})")
    agent.verify_version(to_version, agent.root())
    agent.layout.switch(to_version)
    state.pinned = to_version
    state.pending_switch = None  # the operator's decision replaces any unfinished check
    state.history.append({"at": format_time(datetime.now(UTC)), "event": "switch",
                          "from": current, "to": to_version, "reason": "rollback"})
    save_state(state, agent.state_path)
    click.echo(f"rolled back {current} -> {to_version}; pinned until `deltaship-agent resume`")
    # Tell the model server, like after any switch; the operator's choice stands.
    _notify_server(agent, to_version, f"rolled back to {to_version}")


@main.command()
@_config_option
@_errors
def resume(config_path: Path | None) -> None:
    """Unpin the device and forget failed versions: follow the store again."""
    cfg = _load(config_path)
    path = cfg.state_dir / "state.json"
    with model_dir_lock(cfg.state_dir):
        state = load_state(path)
        was = state.pinned
        state.pinned = None
        state.failed_versions = []
        save_state(state, path)
    click.echo(f"resumed (was pinned at {was})" if was else "resumed (was not pinned)")


@main.command()
@click.option("--repair", is_flag=True, help="Fetch and replace what is damaged.")
@_config_option
@_errors
def verify(repair: bool, config_path: Path | None) -> None:
    """Re-hash the live version against its signed index."""
    cfg = _load(config_path)
    agent = Agent(cfg)
    current = agent.layout.current()
    if current is None:
        raise NotFoundError("no version is installed yet")
    bad = agent.damaged(current, agent.root())
    if not bad:
        click.echo(f"{current}: every file matches its signed sha256")
        return
    if not repair:
        click.echo(f"{current}: damaged: {', '.join(bad)}", err=True)
        raise DeltashipError(f"{len(bad)} damaged file(s): run `deltaship-agent verify --repair`")
    from .repair import repair_version

    with model_dir_lock(cfg.state_dir):
        asyncio.run(repair_version(agent, current, bad))
    click.echo(f"{current}: repaired {', '.join(bad)}")
    _notify_server(agent, current, f"repaired {current}")  # it maps the damaged files


@main.command()
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The agent's model directory [default: from the agent configuration].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port, printed when ready).")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1),
              help="Forward passes computed at once.")
@click.option("--poll-interval", default=1.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds between looks at MODEL_DIR/current when filesystem events are missed.")
@click.option("--pidfile", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the server's pid here (for the agent's signal hook: SIGHUP reloads).")
@click.option("--full-reload", is_flag=True,
              help="Reload every group on a switch instead of the changed ones (for comparison).")
@click.option("-v", "--verbose", is_flag=True, help="Log every swap.")
@_config_option
@_errors
def serve(model_dir: Path | None, host: str, port: int, threads: int, poll_interval: float,
          pidfile: Path | None, full_reload: bool, verbose: bool,
          config_path: Path | None) -> None:
    """Serve the reference MoE model of MODEL_DIR/current over HTTP, hot-swapping its versions.

    \b
    A NumPy forward pass of a Mixtral-style model (embeddings, attention, routed top-k experts,
    head) on the live version. When the agent switches `current`, the server loads and converts
    only the groups that changed, runs a probe forward pass, and swaps the whole model with one
    reference assignment: no request is dropped or sees a mix, and every response carries the
    version that computed it. A version whose probe is not finite is refused and never serves.

    \b
    Endpoints:
      POST /v1/forward   {"tokens": [1, 2, 3]}      next-token top 5 and the logits' sha256
      POST /v1/generate  {"tokens": [...], "max_new_tokens": 8}
      POST /v1/reload    look at `current` now (the agent's --notify-http target)
      GET  /healthz      200 when the version `current` names is live, else 503 and why
      GET  /version      the live version;  GET /stats: requests, swaps, memory

    \b
    Health-gate the agent on it (the agent switches back when the check fails):
      deltaship-agent serve --pidfile /run/deltaship-serve.pid &
      deltaship-agent init ... --notify-signal /run/deltaship-serve.pid \
          --health-url http://127.0.0.1:8000/healthz --health-expect-version
    """
    from .serving.server import ServeConfig
    from .serving.server import serve as run_server

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s deltaship-agent serve: %(message)s", stream=sys.stderr)
    if model_dir is None:
        model_dir = _load(config_path).model_dir
    cfg = ServeConfig(model_dir=model_dir, host=host, port=port, threads=threads,
                      poll_interval=poll_interval, pidfile=pidfile, full_reload=full_reload)

    def ready(url: str, version: str) -> None:
        click.echo(f"serving {version} from {model_dir} at {url} (pid {os.getpid()})")
        sys.stdout.flush()

    asyncio.run(run_server(cfg, ready))


main.help = (main.help or "") + "\n\n" + EXIT_CODES
