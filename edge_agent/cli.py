"""``deltaship-agent``: keep a device's model at the release its trusted manifest names.

Maps flags and the TOML configuration onto :class:`edge_agent.config.AgentConfig`, runs the
update loop, and turns every :class:`manifest.errors.DeltashipError` into one line on stderr
and its exit code.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from manifest.errors import DeltashipError, DiskFullError, LocalError, NotFoundError
from manifest.metadata import format_time
from manifest.stores import write_atomic
from manifest.trust import verify_root

from .config import AgentConfig, default_config_path, load_config, save_config
from .lock import model_dir_lock
from .state import load_state, save_state
from .updater import Agent, run_forever

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES = """\b
Exit codes: 0 success (or up to date); 1 other error; 2 bad local input or configuration;
3 the store sent data that failed verification (nothing was installed); 4 the store could not
be reached; the live model is never touched by a failed update."""


def _errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeltashipError as e:
            click.echo(f"deltaship-agent: error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                err = DiskFullError(f"no space left on device: {e.filename or ''}")
                click.echo(f"deltaship-agent: error: {err}", err=True)
                sys.exit(err.exit_code)
            raise

    return wrapper  # type: ignore[return-value]


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
@_config_option
@_errors
def init(store: str, trust: Path, model_dir: Path, device_id: str | None, interval: float,
         include: tuple[str, ...], endpoint_url: str | None, max_rate: float | None, keep: int,
         expiry_grace: float, config_path: Path | None) -> None:
    """Write the agent configuration and pin the trust root."""
    try:
        root_bytes = trust.read_bytes()
    except OSError as e:
        raise LocalError(f"cannot read the trust root {trust}: {e.strerror}") from e
    verify_root(root_bytes, now=datetime.now(UTC))
    model_dir = model_dir.absolute()
    cfg = AgentConfig(store=store, model_dir=model_dir, device_id=_device_id(device_id),
                      interval=interval, include=include, endpoint_url=endpoint_url,
                      max_rate=max_rate, keep=keep, expiry_grace=expiry_grace)
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
    """Current and retained versions, pin, last check and error, bytes, the plan in progress."""
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
    for k, v in info.items():
        click.echo(f"{k.replace('_', ' '):<18} {v if v not in (None, []) else '-'}")


@main.command()
@click.option("--to", "to_version", help="Retained version to switch to [default: the previous].")
@_config_option
@_errors
def rollback(to_version: str | None, config_path: Path | None) -> None:
    """Switch to a retained version (re-verified) and pin the device there; works offline."""
    cfg = _load(config_path)
    with model_dir_lock(cfg.state_dir):
        _rollback(cfg, to_version)


def _rollback(cfg: AgentConfig, to_version: str | None) -> None:
    agent = Agent(cfg)
    state = load_state(agent.state_path)
    current = agent.layout.current()
    if to_version is None:
        previous = [h.get("from") for h in reversed(state.history) if h.get("event") == "switch"]
        to_version = next((v for v in previous if v and v != current
                           and agent.layout.has_version(v)), None)
        if to_version is None:
            raise NotFoundError("no previous version is retained on this device")
    if not agent.layout.has_version(to_version):
        raise NotFoundError(f"version {to_version} is not retained on this device "
                            f"(retained: {', '.join(agent.layout.retained()) or 'none'})")
    agent.verify_version(to_version, agent.root())
    agent.layout.switch(to_version)
    state.pinned = to_version
    state.history.append({"at": format_time(datetime.now(UTC)), "event": "switch",
                          "from": current, "to": to_version, "reason": "rollback"})
    save_state(state, agent.state_path)
    click.echo(f"rolled back {current} -> {to_version}; pinned until `deltaship-agent resume`")


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


main.help = (main.help or "") + "\n\n" + EXIT_CODES
