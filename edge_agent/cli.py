"""``deltaship-agent``: keep a device's model at the release its trusted manifest names.

Only maps flags and the TOML configuration onto :class:`edge_agent.config.AgentConfig`, calls
the service loop (:mod:`edge_agent.service`) or an operator command (:mod:`edge_agent.operations`),
prints what it returns, and turns every :class:`manifest.errors.DeltashipError` into one line
on stderr and its exit code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource

from manifest.cli_errors import OneLineGroup, exit_codes_help, exit_on_errors
from manifest.constants import DEFAULT_CHANNEL
from manifest.errors import LocalError

from .config import (
    REPORT_MODES,
    AgentConfig,
    check_config,
    default_config_path,
    load_config,
)
from .hook_flags import TIMING_FLAGS, hooks_from_flags

if TYPE_CHECKING:
    from .operations import Operator, StatusReport

# The update machinery (operations, service, updater and what they import) is loaded by the
# commands that run it, not by `--help` or flag parsing: start-up time matters to cron jobs and
# small devices (docs/BENCHMARKS.md, bench_startup).

F = TypeVar("F", bound=Callable[..., Any])

EXIT_NOTES = ("3: nothing was installed. 6: after an update the agent switched back to the "
              "previous version; after a rollback the rollback stands. The live model is never "
              "touched by a failed update.")


_errors = exit_on_errors("deltaship-agent")


_config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="DELTASHIP_AGENT_CONFIG",
    help="Agent configuration file [default: /etc/deltaship/agent.toml as root, else "
    "~/.config/deltaship/agent.toml; env: DELTASHIP_AGENT_CONFIG].",
)


_json_option = click.option("--json", "as_json", is_flag=True,
                            help="Print the result as JSON (stdout: that document only).")


def _print_json(doc: dict[str, Any]) -> None:
    click.echo(json.dumps(doc, indent=2))


_wait_option = click.option(
    "--wait", default=30.0, show_default=True, metavar="SECONDS", type=click.FloatRange(min=0),
    help="Wait at most this long for an update in progress (the model directory's lock), then "
    "give up (exit 5) naming the process that holds it.",
)


def _load(config_path: Path | None) -> AgentConfig:
    return load_config(config_path or default_config_path())


def _operator(cfg: AgentConfig, **options: Any) -> Operator:
    from .operations import Operator

    return Operator(cfg, **options)


def _store_url(store: str) -> str:
    """``store`` checked (a bad URL is exit 2), and a directory given as a relative path made
    absolute: the service runs with another working directory than `init` did."""
    from manifest.storage.location import parse_store_url

    location = parse_store_url(store)
    if location.kind == "file" and location.path is not None and \
            not store.startswith("file:"):
        return str(location.path)
    return store


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


@click.group(cls=OneLineGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
              help="Seconds between polls (±20 % jitter; see `run --help`).")
@click.option("--channel", default=DEFAULT_CHANNEL, show_default=True, metavar="NAME",
              help="The release channel this device follows (its own signed manifest in the "
              "store; a manifest of another channel is refused, exit 3).")
@click.option("--report", "report", type=click.Choice(REPORT_MODES), default="off",
              show_default=True,
              help="After every cycle write a small report to the store as "
              "reports/<device-id>.json (`store`: the device needs write access to that key, "
              "see README \"Running a fleet\"; an s3:// or directory store).")
@click.option("--report-url", metavar="URL",
              help="After every cycle POST the report (JSON) to this http(s) URL. Redirects "
              "are followed only to the same host.")
@click.option("--report-deadline", default=10.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(1, 3600),
              help="The longest all report writes of one cycle may take; a report never "
              "fails or holds an update, and one not sent is retried with the next cycle.")
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
@click.option("--document-deadline", default=300.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0, min_open=True),
              help="The longest one try of fetching the manifest or a release index may take "
              "(then retried, at most 6 tries).")
@click.option("--min-rate", default=1024.0, show_default=True, metavar="BYTES/S",
              type=click.FloatRange(min=0, min_open=True),
              help="A transfer slower than this on average over --rate-window is abandoned and "
              "retried (downloads resume where they stopped).")
@click.option("--rate-window", default=60.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0, min_open=True),
              help="The sliding window over which --min-rate is judged.")
@click.option("--allow-redirect-host", "allow_redirect_hosts", multiple=True,
              metavar="HOST[:PORT]",
              help="An HTTP store may redirect to this host (e.g. a CDN); by default only "
              "redirects within the store's own scheme, host and port are followed. Repeat for "
              "several.")
@_wait_option
@_json_option
@_config_option
@_errors
def init(store: str, trust: Path, model_dir: Path, device_id: str | None, interval: float,
         channel: str, report: str, report_url: str | None, report_deadline: float,
         include: tuple[str, ...], endpoint_url: str | None, max_rate: float | None, keep: int,
         expiry_grace: float, document_deadline: float, min_rate: float, rate_window: float,
         allow_redirect_hosts: tuple[str, ...], wait: float, as_json: bool,
         config_path: Path | None, **hook_flags: Any) -> None:
    """Write the agent configuration and pin the trust root.

    After each switch the agent can tell the model server (--notify-*: HTTP requests, then
    commands, then signals) and then check that it is healthy (--health-*). If a hook or the
    check fails, the agent switches back to the previous version (`run --once` exits 6) and does
    not retry the failed one until a newer release or `deltaship-agent resume`. For what these
    flags do not cover (another order or method, a timeout per hook), edit the [hooks] table of
    the configuration file.
    """
    ctx = click.get_current_context()
    given = {p for p in TIMING_FLAGS
             if ctx.get_parameter_source(p) is not ParameterSource.DEFAULT}
    hooks = hooks_from_flags(given, **hook_flags)
    cfg = check_config(AgentConfig(
        store=_store_url(store), model_dir=model_dir.absolute(), device_id=_device_id(device_id),
        interval=interval, include=include, endpoint_url=endpoint_url, max_rate=max_rate,
        keep=keep, expiry_grace=expiry_grace, hooks=hooks,
        document_deadline=document_deadline, min_rate=min_rate, rate_window=rate_window,
        allow_redirect_hosts=allow_redirect_hosts, channel=channel, report=report,
        report_url=report_url, report_deadline=report_deadline))
    path = config_path or default_config_path()
    pinned = _operator(cfg, wait=wait).init(trust, path)
    if as_json:
        _print_json({"config": str(path), "trust_root": str(pinned), "store": cfg.store,
                     "model_dir": str(cfg.model_dir), "device_id": cfg.device_id,
                     "channel": cfg.channel})
        return
    click.echo(f"configuration written to {path}\ntrust root pinned at {pinned}\n"
               f"device id {cfg.device_id}, channel {cfg.channel}; start with "
               "`deltaship-agent run`")


@main.command()
@click.option("--once", is_flag=True, help="One update cycle, then exit (0 when up to date).")
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
@_config_option
@_errors
def run(once: bool, verbose: bool, config_path: Path | None) -> None:
    """Poll the store and apply updates until stopped (SIGTERM/SIGINT stop it cleanly).

    \b
    When it polls (so that a fleet never polls in step):
      * the first poll comes after a random delay within the interval (--once: at once);
      * then every interval, each one 80-120 % of it (random jitter);
      * after the store failed (exit 4 in --once) n times in a row: a random delay between
        0 and min(interval, 6 h, B * 2^(n-1)), B = min(interval / 8, 30 s), at least 1 s;
      * never sooner than a Retry-After of the store's 429/503 answers (seconds or an HTTP
        date; at most 6 h).
    """
    import asyncio

    from .service import run_forever

    logging.basicConfig(level=logging.INFO if verbose or not once else logging.WARNING,
                        format="%(asctime)s deltaship-agent: %(message)s", stream=sys.stderr)
    cfg = _load(config_path)
    code = asyncio.run(run_forever(cfg, once=once))
    if once:
        click.echo(_operator(cfg).status().state.last_result or "")
    sys.exit(code)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_config_option
@_errors
def status(as_json: bool, config_path: Path | None) -> None:
    """Current and retained versions, pin, failed versions, last check and error, the plan in
    progress, what the last update downloaded, and every expiry (the trust root, the release
    content, its freshness) with a warning line when one is near or past."""
    report = _operator(_load(config_path)).status()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    for k, v in _status_text(report).items():
        if isinstance(v, list):  # retained, failed versions: names, not a Python list
            v = ", ".join(map(str, v))
        click.echo(f"{k.replace('_', ' '):<24} {v if v not in (None, '') else '-'}")
    for w in report.warnings:
        click.echo(w)


def _status_text(report: StatusReport) -> dict[str, Any]:
    info = report.to_dict()
    plan, last = report.state.plan, report.state.last_update
    if plan:
        info["plan"] = (f"{plan.version}: {plan.done_bytes} of {plan.download_bytes} bytes "
                        f"downloaded (full {plan.full_bytes})")
    if last:
        info["last_update"] = (
            f"{last.from_ or 'nothing'} -> {last.version} at {last.at}: "
            f"{last.downloaded_bytes} bytes downloaded (full {last.full_bytes}), "
            f"{last.groups_changed} of {last.groups} groups changed")
    del info["root_version"], info["expires"]
    r = report.rollout
    if r:
        share = f"{r['basis_points'] / 100:g} %"
        info["rollout"] = (f"{r['candidate']} {r['state']} at {share} (fallback "
                           f"{r['fallback']}); bucket {r['bucket']}: this device "
                           f"{'is in' if r['in'] else 'is not in'}, runs {r['target']}")
    for e in report.expiries:  # the pinned root's, the release content's, its freshness'
        version = f"version {report.root_version}, " if e.name == "root" else ""
        when = "past" if e.at <= e.now else f"in {e.days_left} days"
        info[f"{e.label} expires"] = f"{version}{e.at_text} ({when})"
    return info


@main.command()
@click.option("--to", "to_version",
              help="Retained version to switch to [default: the version that was live before "
              "the current one (repeat to go further back), skipping versions that failed "
              "their health check].")
@_wait_option
@_json_option
@_config_option
@_errors
def rollback(to_version: str | None, wait: float, as_json: bool,
             config_path: Path | None) -> None:
    """Switch to a retained version (re-verified) and pin the device there; works offline.

    When the model server then fails its check (--notify-*/--health-* of `init`), the
    rollback stands and the command exits 6 after printing its result.
    """
    result = _operator(_load(config_path), wait=wait).rollback(to_version)
    if as_json:
        _print_json({"previous": result.previous, "version": result.version, "pinned": True,
                     "healthy": result.unhealthy is None})
    else:
        click.echo(f"rolled back {result.previous} -> {result.version}; "
                   "pinned until `deltaship-agent resume`")
    if result.unhealthy is not None:
        raise result.unhealthy


@main.command()
@_wait_option
@_json_option
@_config_option
@_errors
def resume(wait: float, as_json: bool, config_path: Path | None) -> None:
    """Unpin the device and forget failed versions: follow the store again."""
    was = _operator(_load(config_path), wait=wait).resume()
    if as_json:
        _print_json({"was_pinned": was})
        return
    click.echo(f"resumed (was pinned at {was})" if was else "resumed (was not pinned)")


@main.command()
@click.option("--repair", is_flag=True, help="Fetch and replace what is damaged.")
@_wait_option
@_json_option
@_config_option
@_errors
def verify(repair: bool, wait: float, as_json: bool, config_path: Path | None) -> None:
    """Re-hash the live version against its signed index (exit 2 when files are damaged).

    With --json the result is printed first (damaged files included), then the exit code
    and error line are the same as without it.
    """
    result = _operator(_load(config_path), wait=wait).verify(repair)
    current = result.version
    if as_json:
        _print_json({"version": current, "damaged": list(result.damaged),
                     "repaired": result.repaired, "healthy": result.unhealthy is None})
    if not result.damaged:
        if as_json:
            return
        click.echo(f"{current}: every file matches its signed sha256")
        return
    if not result.repaired:  # the device's own files: the operator repairs them (exit 2)
        shown = ", ".join(result.damaged[:5]) + (", ..." if len(result.damaged) > 5 else "")
        raise LocalError(f"{current}: {len(result.damaged)} damaged file(s) ({shown}): run "
                         "`deltaship-agent verify --repair`")
    if not as_json:
        click.echo(f"{current}: repaired {', '.join(result.damaged)}")
    if result.unhealthy is not None:  # the server maps the replaced files
        raise result.unhealthy


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
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0),
              help="Requests that may wait for a thread; more are answered 503 with Retry-After.")
@click.option("--request-timeout", default=30.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0, min_open=True),
              help="Time from a request's arrival to its answer (waiting included); a request "
              "over it is answered 503 and its work stopped. Also bounds the stop on SIGTERM.")
@click.option("--full-reload", is_flag=True,
              help="Reload every group on a switch instead of the changed ones (for comparison).")
@click.option("-v", "--verbose", is_flag=True, help="Log every swap.")
@_config_option
@_errors
def serve(model_dir: Path | None, host: str, port: int, threads: int, poll_interval: float,
          pidfile: Path | None, max_queue: int, request_timeout: float, full_reload: bool,
          verbose: bool, config_path: Path | None) -> None:
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
      GET  /version      the live version;  GET /stats: requests, swaps, memory, queue

    \b
    Forward passes wait in a bounded queue: a request beyond --max-queue, or not answered
    within --request-timeout, gets 503 with Retry-After; a client that disconnects takes its
    work with it. SIGTERM answers the waiting requests 503 and exits within the timeout.

    \b
    Health-gate the agent on it (the agent switches back when the check fails):
      deltaship-agent serve --pidfile /run/deltaship-serve.pid &
      deltaship-agent init ... --notify-signal /run/deltaship-serve.pid \
          --health-url http://127.0.0.1:8000/healthz --health-expect-version
    """
    import asyncio

    from .serving.server import ServeConfig
    from .serving.server import serve as run_server

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s deltaship-agent serve: %(message)s", stream=sys.stderr)
    if model_dir is None:
        model_dir = _load(config_path).model_dir
    cfg = ServeConfig(model_dir=model_dir, host=host, port=port, threads=threads,
                      poll_interval=poll_interval, pidfile=pidfile, full_reload=full_reload,
                      max_queue=max_queue, request_timeout=request_timeout)

    def ready(url: str, version: str) -> None:
        click.echo(f"serving {version} from {model_dir} at {url} (pid {os.getpid()})")
        sys.stdout.flush()

    asyncio.run(run_server(cfg, ready))


main.help = (main.help or "") + "\n\n" + exit_codes_help(EXIT_NOTES)
