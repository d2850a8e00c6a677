"""``deltaship-publish promote | rollout | fleet status``: channels, staged rollouts and what the
fleet reports, on the command line (the logic: :mod:`publisher.fleet_admin`,
:mod:`publisher.fleet`)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import click
from click.core import ParameterSource

from manifest.errors import LocalError
from manifest.storage.store import StoreOptions

from .cli_options import (
    channel_name,
    channel_option,
    draft_option,
    errors,
    insecure_key_option,
    keys_option,
    lifetime_options,
    now,
    percent,
    store_options,
)
from .cli_trust import print_published
from .drafts import Lifetimes
from .fleet import (
    AdvancePolicy,
    FleetStatus,
    RolloutChange,
    parse_duration,
    parse_percent,
    parse_stages,
    percent_text,
)
from .fleet_admin import Signing, advance, change_rollout, promote, status

__all__ = ["print_status", "register"]

_KEY_HELP = ("Private signing key: release and timestamp keys, enough for their thresholds "
             "(repeatable).")
# `rollout` options that only --advance reads.
_ADVANCE_ONLY = ("stages", "every", "max_failure_rate", "min_devices", "revoke_on_failure")
_OPS = ("--percent", "--ramp", "--halt", "--complete", "--revoke", "--advance")



def _signing(keys: tuple[Path, ...], draft: Path | None, expires_days: int,
             timestamp_days: int, insecure: bool) -> Signing:
    return Signing(keys, draft, insecure=insecure,
                   lifetimes=Lifetimes(timedelta(days=expires_days),
                                       timedelta(days=timestamp_days)))


def _one_op(given: dict[str, bool]) -> str:
    chosen = [name for name, on in given.items() if on]
    if len(chosen) != 1:
        raise click.UsageError(f"choose exactly one of {', '.join(_OPS)}"
                               + (f" (got {', '.join(chosen)})" if chosen else ""))
    return chosen[0]


def register(main: click.Group) -> None:
    """Add ``promote``, ``rollout`` and ``fleet status`` to ``deltaship-publish``."""

    @main.command("promote")
    @store_options
    @click.option("--from", "source", required=True, metavar="CHANNEL", callback=channel_name,
                  help="The channel the version was released to (e.g. beta).")
    @click.option("--to", "target", required=True, metavar="CHANNEL", callback=channel_name,
                  help="The channel to make it current in (e.g. stable).")
    @click.option("--version", "version", required=True, help="The version to promote.")
    @click.option("--rollout", "rollout_bp", callback=percent, metavar="PERCENT",
                  help="Stage it: the candidate for PERCENT of the target channel's devices.")
    @keys_option(_KEY_HELP)
    @draft_option
    @lifetime_options
    @insecure_key_option
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @errors
    def promote_cmd(store_url: str, endpoint_url: str | None, source: str, target: str,
                    version: str, rollout_bp: int | None, keys: tuple[Path, ...],
                    draft: Path | None, expires_days: int, timestamp_days: int,
                    insecure_key_permissions: bool, as_json: bool) -> None:
        """Make a version of one channel current in another, uploading nothing.

        The version is found through the source channel's signed release record; the target
        channel gets a new manifest naming it (sequence + 1) and its own record of it. Objects
        are shared by every channel, so devices of the target channel download exactly what
        devices of the source channel did.
        """
        p = promote(store_url, version, source, target,
                    _signing(keys, draft, expires_days, timestamp_days,
                             insecure_key_permissions), now(), rollout_bp=rollout_bp,
                    options=StoreOptions(endpoint_url))
        print_published(p, as_json)

    @main.command("rollout")
    @store_options
    @channel_option
    @click.option("--percent", "percent_bp", callback=percent, metavar="PERCENT",
                  help="Set the candidate's share (e.g. 5, 0.5); resumes a halted rollout.")
    @click.option("--ramp", metavar="DURATION",
                  help="Widen linearly over DURATION (e.g. 6h, 2d) from --from to --to.")
    @click.option("--from", "from_bp", callback=percent, metavar="PERCENT",
                  help="Where a --ramp starts (default: the share now).")
    @click.option("--to", "to_bp", callback=percent, metavar="PERCENT",
                  help="Where a --ramp ends (default 100).")
    @click.option("--halt", is_flag=True, help="No new device takes the candidate; devices "
                  "that run it keep it.")
    @click.option("--complete", is_flag=True, help="Make the candidate current for every "
                  "device (no rollout).")
    @click.option("--revoke", is_flag=True, help="Send devices that run the candidate back to "
                  "the fallback; they record it as failed.")
    @click.option("--advance", "advance_", is_flag=True,
                  help="Decide from device reports: halt, widen to the next stage, complete, "
                  "or nothing (safe from cron).")
    @click.option("--stages", default="1,5,25,100", show_default=True,
                  help="--advance: the shares to widen through, in percent.")
    @click.option("--every", default="6h", show_default=True, metavar="DURATION",
                  help="--advance: at least this long at a stage before widening.")
    @click.option("--max-failure-rate", default="2%", show_default=True, metavar="PERCENT",
                  help="--advance: halt when more of the candidate's reporting devices fail.")
    @click.option("--min-devices", default=20, show_default=True, type=click.IntRange(min=1),
                  help="--advance: devices that must have reported for the candidate before "
                  "it is judged or widened.")
    @click.option("--revoke-on-failure", is_flag=True,
                  help="--advance: revoke instead of halting.")
    @keys_option(_KEY_HELP)
    @draft_option
    @lifetime_options
    @insecure_key_option
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @errors
    def rollout_cmd(store_url: str, endpoint_url: str | None, channel: str,
                    percent_bp: int | None, ramp: str | None, from_bp: int | None,
                    to_bp: int | None, halt: bool, complete: bool, revoke: bool,
                    advance_: bool, stages: str, every: str, max_failure_rate: str,
                    min_devices: int, revoke_on_failure: bool, keys: tuple[Path, ...],
                    draft: Path | None, expires_days: int, timestamp_days: int,
                    insecure_key_permissions: bool, as_json: bool) -> None:
        """Change the channel's staged rollout: one new signed manifest (sequence + 1).

        A staged rollout (`release --rollout P`, `promote --rollout P`) names a candidate and
        a share of devices; the others run the fallback (the current version). A device is in
        when SHA-256(repository id, candidate, device id) mod 10000 is below the share in
        basis points: decided on each device, a different part of the fleet first for each
        release.

        --advance decides from the devices' reports (one line says what and why): halt
        (or revoke) a failing candidate, widen to the next stage, complete, or nothing.

        \b
        From cron or a timer (in a crontab: one line, and % written as \\%):
          deltaship-publish rollout --advance --store URL --stages 1,5,25,100 \\
              --every 6h --max-failure-rate 2% --min-devices 20 --key release.key
        """
        op = _one_op({"--percent": percent_bp is not None, "--ramp": ramp is not None,
                      "--halt": halt, "--complete": complete, "--revoke": revoke,
                      "--advance": advance_})
        if (from_bp is not None or to_bp is not None) and op != "--ramp":
            raise click.UsageError("--from and --to go with --ramp")
        if op != "--advance":
            ctx = click.get_current_context()
            given = [f"--{name.replace('_', '-')}" for name in _ADVANCE_ONLY
                     if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
            if given:
                raise click.UsageError(f"{', '.join(given)} "
                                       f"{'goes' if len(given) == 1 else 'go'} with --advance")
        signing = _signing(keys, draft, expires_days, timestamp_days, insecure_key_permissions)
        options, t = StoreOptions(endpoint_url), now()
        if op == "--advance":
            policy = AdvancePolicy(parse_stages(stages), parse_duration(every, "--every"),
                                   parse_percent(max_failure_rate, "--max-failure-rate"),
                                   min_devices, revoke_on_failure)
            decision, published = advance(store_url, channel, policy, signing, t, options)
            if as_json:
                out = decision.to_dict()
                out["channel"] = channel
                out["draft"] = str(published.draft_path) if published and \
                    published.draft_path else None
                click.echo(json.dumps(out))
                return
            click.echo(f"{decision.action}: {decision.reason}")
            if published is not None:
                print_published(published, False)
            return
        change = {
            "--percent": lambda: RolloutChange("percent", percent_bp or 0),
            "--ramp": lambda: RolloutChange("ramp", ramp=parse_duration(ramp or "", "--ramp"),
                                            start_bp=from_bp,
                                            end_bp=10_000 if to_bp is None else to_bp),
        }.get(op, lambda: RolloutChange(op.removeprefix("--")))()
        print_published(change_rollout(store_url, channel, change, signing, t, options),
                        as_json)

    @main.group("fleet")
    def fleet_group() -> None:
        """What the devices report (reports/<device-id>.json in the store)."""

    @fleet_group.command("status")
    @store_options
    @channel_option
    @click.option("--poll-interval", default="1h", show_default=True, metavar="DURATION",
                  help="How often devices poll (their --interval).")
    @click.option("--stale", default=3, show_default=True, type=click.IntRange(min=1),
                  metavar="N", help="Name devices not seen for more than N poll intervals.")
    @click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
    @errors
    def status_cmd(store_url: str, endpoint_url: str | None, channel: str,
                   poll_interval: str, stale: int, as_json: bool) -> None:
        """Devices per version and state, failures per version with their most common
        error lines, devices not seen lately, and the rollout stage with how many reporting
        devices it covers. Malformed reports are counted and named, never fatal."""
        interval = parse_duration(poll_interval, "--poll-interval")
        try:
            stale_after = interval * stale
        except OverflowError:
            raise LocalError(f"--stale {stale} poll intervals of {poll_interval} is too long"
                             ) from None
        st = status(store_url, channel, now(), stale_after, StoreOptions(endpoint_url))
        if as_json:
            click.echo(json.dumps(st.to_dict(), indent=2))
        else:
            print_status(st, store_url, stale)


def print_status(st: FleetStatus, store: str, stale: int) -> None:
    current = (f"current {st.current} (manifest sequence {st.sequence})" if st.current
               else "no release yet")
    click.echo(f"channel {st.channel} of {store}: {current}; {st.devices} device(s) reported")
    ro = st.rollout
    if ro is not None:
        click.echo(f"rollout: candidate {ro.candidate} {ro.state} at {percent_text(ro.share_bp)}"
                   f" (fallback {ro.fallback}); {ro.covered} of {st.devices} reporting "
                   f"device(s) targeted at it; candidate: {ro.health.rate_text}")
    if st.by_version:
        click.echo("devices per version and state:")
        for version, states in st.by_version.items():
            cells = ", ".join(f"{s} {n}" for s, n in states.items())
            click.echo(f"  {version:<20} {cells}")
    if st.failures:
        click.echo("failures per version:")
        for f in st.failures:
            click.echo(f"  {f.version:<20} {f.devices} device(s)")
            for line, n in f.errors:
                click.echo(f"    {n:>5} x {line}")
    seconds = int(st.stale_after.total_seconds())
    if st.stale:
        shown = ", ".join(st.stale[:20]) + (f", ... ({len(st.stale) - 20} more)"
                                             if len(st.stale) > 20 else "")
        click.echo(f"not seen for more than {stale} poll intervals ({seconds} s): "
                   f"{len(st.stale)} device(s): {shown}")
    if st.other_channels:
        click.echo(f"({st.other_channels} report(s) of other channels not counted)")
    if st.malformed:
        click.echo(f"malformed reports: {len(st.malformed)}")
        for key, why in st.malformed[:20]:
            click.echo(f"  {key}: {why}")
