"""``deltaship-publish refresh | sign | publish | root edit/sign/publish``: the trust lifecycle
on the command line (the logic: :mod:`publisher.trust_admin`)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import click

from manifest.constants import DEFAULT_CHANNEL
from manifest.metadata import format_time
from manifest.storage.store import StoreOptions

from .cli_options import (
    MAX_DAYS,
    channel_option,
    draft_option,
    errors,
    insecure_key_option,
    keys_option,
    lifetime_options,
    now,
    store_options,
)
from .drafts import Lifetimes, Published
from .fleet import percent_text
from .trust_admin import RootEdit, edit_root, publish_file, refresh, sign_file

__all__ = ["print_draft_status", "print_published", "register"]


def print_draft_status(path: Path, missing: tuple[str, ...] | list[str]) -> None:
    if missing:
        click.echo(f"draft written to {path}; still needed:")
        for line in missing:
            click.echo(f"  {line}")
        click.echo(f"each key holder runs: deltaship-publish sign {path} --key KEY")
    else:
        click.echo(f"draft written to {path}, fully signed")
    click.echo(f"then: deltaship-publish publish {path} --store STORE")


def print_published(p: Published, as_json: bool) -> None:
    if p.draft_path is not None:
        if as_json:
            click.echo(json.dumps({"draft": str(p.draft_path), "missing": list(p.missing),
                                   "signed": [list(s) for s in p.signed]}))
        else:
            print_draft_status(p.draft_path, p.missing)
        return
    ts = p.timestamp
    rollout = ts.manifest.rollout if ts else None
    if as_json:
        out: dict[str, object] = {"kind": p.kind, "store": p.store, "written": list(p.written)}
        if ts is not None:
            out.update({"channel": p.channel,
                        "rollout": rollout.to_dict() if rollout else None,
                        "current": ts.current.version, "sequence": ts.manifest.sequence,
                        "timestamp_sequence": ts.sequence, "root_version": ts.root_version,
                        "expires": format_time(ts.manifest.expires),
                        "fresh_until": format_time(ts.expires)})
        if p.root is not None:
            out.update({"root_version": p.root.version,
                        "expires": format_time(p.root.expires)})
        click.echo(json.dumps(out))
        return
    if ts is not None:
        verb = {"revert": "reverted", "refresh": "refreshed", "promote": "promoted",
                "rollout": "rollout changed"}.get(p.kind, "published")
        channel = "" if p.channel == DEFAULT_CHANNEL else f" in channel {p.channel}"
        click.echo(f"{verb}: {ts.current.version} is current{channel} (manifest sequence "
                   f"{ts.manifest.sequence}, timestamp {ts.sequence}); fresh until "
                   f"{format_time(ts.expires)}, content valid until "
                   f"{format_time(ts.manifest.expires)}")
        if rollout is not None:
            click.echo(f"  rollout: candidate {rollout.candidate.version} {rollout.state} at "
                       f"{percent_text(rollout.share(ts.manifest.published_at))} of devices"
                       + (f", ramping to {percent_text(rollout.ramp.end_bp)} by "
                          f"{format_time(rollout.ramp.end)}" if rollout.ramp else "")
                       + f"; {ts.current.version} is the fallback")
    if p.root is not None:
        click.echo(f"published trust root v{p.root.version} (expires "
                   f"{format_time(p.root.expires)}) to {p.store}; devices adopt it at the next "
                   "manifest that names it (the next `refresh` or release)")


def _role_pairs(value: tuple[str, ...], what: str) -> list[tuple[str, str]]:
    out = []
    for item in value:
        role, sep, rest = item.partition("=")
        if not sep or not rest:
            raise click.BadParameter(f"{item!r}: expected ROLE={what}")
        out.append((role, rest))
    return out


def register(main: click.Group) -> None:
    """Add the trust lifecycle commands to ``deltaship-publish``."""

    @main.command("refresh")
    @store_options
    @channel_option
    @keys_option("Private timestamp key (with --content, also release keys); repeatable.")
    @click.option("--content", is_flag=True,
                  help="Also re-sign the release content with the release keys (renews its "
                  "year; needed after the release keys were rotated).")
    @draft_option
    @lifetime_options
    @insecure_key_option
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @errors
    def refresh_cmd(store_url: str, endpoint_url: str | None, channel: str,
                    keys: tuple[Path, ...], content: bool, draft: Path | None,
                    expires_days: int, timestamp_days: int, insecure_key_permissions: bool,
                    as_json: bool) -> None:
        """Re-sign the freshness of the current release with the timestamp key.

        Devices refuse a manifest whose freshness has expired (a freeze attack looks the
        same as a publisher that went quiet). Run this weekly from a timer: with the default
        --timestamp-days 28, two failed weekly runs in a row still leave devices a week. It
        changes nothing else: same release, same content, a higher timestamp sequence, and
        the newest trust root version (so devices learn of a root rotation). Each channel
        has its own manifest: refresh every channel devices follow (--channel).

        \b
        systemd: scripts/deltaship-refresh.{service,timer}
        cron:    17 3 * * 1 deltaship-publish refresh --store URL --key /etc/deltaship/timestamp.key
        """
        p = refresh(store_url, keys, now(), content=content,
                    lifetimes=Lifetimes(timedelta(days=expires_days),
                                        timedelta(days=timestamp_days)),
                    options=StoreOptions(endpoint_url),
                    insecure_key_permissions=insecure_key_permissions, draft=draft,
                    channel=channel)
        print_published(p, as_json)

    def _sign(path: Path, keys: tuple[Path, ...], insecure: bool, as_json: bool) -> None:
        added, missing = sign_file(path, keys, insecure_key_permissions=insecure)
        if as_json:
            click.echo(json.dumps({"draft": str(path), "added": [list(a) for a in added],
                                   "missing": missing}))
            return
        for name, kid in added:
            click.echo(f"signed {name} with key {kid[:16]}")
        if not added:
            click.echo("nothing to add: these keys had signed already")
        if missing:
            click.echo("still needed:")
            for line in missing:
                click.echo(f"  {line}")
        else:
            click.echo(f"every threshold is met: deltaship-publish publish {path} --store STORE")

    @main.command("sign")
    @click.argument("draft", type=click.Path(dir_okay=False, path_type=Path))
    @keys_option("Private key to sign with (repeatable); only that key is needed.")
    @insecure_key_option
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @errors
    def sign_cmd(draft: Path, keys: tuple[Path, ...], insecure_key_permissions: bool,
                 as_json: bool) -> None:
        """Add signatures to DRAFT (from `release|revert|refresh --draft` or `root edit`).

        Run on each key holder's machine with only that holder's key; no store access is
        needed. Each key signs every document of the draft its roles may sign.
        """
        _sign(draft, keys, insecure_key_permissions, as_json)

    @main.command("publish")
    @click.argument("draft", type=click.Path(dir_okay=False, path_type=Path))
    @store_options
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @errors
    def publish_cmd(draft: Path, store_url: str, endpoint_url: str | None,
                    as_json: bool) -> None:
        """Publish a signed DRAFT once every threshold is met.

        Refused if the store changed since the draft was made (another release, revert or
        refresh: exit 5, make the draft again) or its trust root is not the draft's.
        """
        print_published(publish_file(draft, store_url, now(), StoreOptions(endpoint_url)),
                        as_json)

    @main.group("root")
    def root_group() -> None:
        """Rotate the trust root: edit a successor, sign it with the old and new root keys,
        publish it (devices follow the chain roots/1.json, roots/2.json, ...)."""

    @root_group.command("edit")
    @store_options
    @click.option("--add-key", "add", multiple=True, metavar="ROLE=PUBFILE",
                  help="Add a key (its .pub file) to ROLE; repeatable.")
    @click.option("--remove-key", "remove", multiple=True, metavar="ROLE=KEYID|PUBFILE",
                  help="Remove a key (its id, a unique prefix, or its file) from ROLE.")
    @click.option("--threshold", "thresholds", multiple=True, metavar="ROLE=N",
                  help="Set ROLE's threshold; repeatable.")
    @click.option("--expires-days", default=365, show_default=True,
                  type=click.IntRange(1, MAX_DAYS), help="Lifetime of the new root.")
    @click.option("--out", "out", required=True,
                  type=click.Path(dir_okay=False, path_type=Path), help="The draft to write.")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @errors
    def root_edit(store_url: str, endpoint_url: str | None, add: tuple[str, ...],
                  remove: tuple[str, ...], thresholds: tuple[str, ...], expires_days: int,
                  out: Path, as_json: bool) -> None:
        """Write an unsigned successor of the store's newest trust root (version + 1).

        It must then be signed by a threshold of the OLD root keys and of the NEW root keys
        (`deltaship-publish root sign DRAFT --key K` on each holder's machine) and published
        (`deltaship-publish root publish DRAFT --store S`). Renewing the root's expiry alone:
        no --add/--remove options.
        """
        edit = RootEdit()
        for role, path in _role_pairs(add, "PUBFILE"):
            edit.add_key(role, Path(path))
        for role, key in _role_pairs(remove, "KEYID"):
            edit.remove_key(role, key)
        for role, n in _role_pairs(thresholds, "N"):
            if not n.isdigit() or int(n) < 1:
                raise click.BadParameter(f"--threshold {role}={n}: N must be at least 1")
            edit.thresholds[role] = int(n)
        edit.expires = timedelta(days=expires_days)
        old, new = edit_root(store_url, edit, now(), out, options=StoreOptions(endpoint_url))
        if as_json:
            click.echo(json.dumps({"draft": str(out), "version": new.version,
                                   "roles": {n: r.to_dict() for n, r in new.roles.items()},
                                   "expires": format_time(new.expires)}))
            return
        click.echo(f"draft of trust root v{new.version} (from v{old.version}) written to {out}")
        for name, r in new.roles.items():
            click.echo(f"  {name:<10} {r.threshold} of {len(r.keyids)}: "
                       + ", ".join(k[:16] for k in r.keyids))
        click.echo(f"sign with {old.roles['root'].threshold} old and "
                   f"{new.roles['root'].threshold} new root key(s): "
                   f"deltaship-publish root sign {out} --key KEY")

    @root_group.command("sign")
    @click.argument("draft", type=click.Path(dir_okay=False, path_type=Path))
    @keys_option("Private root key (old or new) to sign with; repeatable.")
    @insecure_key_option
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @errors
    def root_sign(draft: Path, keys: tuple[Path, ...], insecure_key_permissions: bool,
                  as_json: bool) -> None:
        """Add a root key's signature to a root DRAFT (same as `sign`)."""
        _sign(draft, keys, insecure_key_permissions, as_json)

    @root_group.command("publish")
    @click.argument("draft", type=click.Path(dir_okay=False, path_type=Path))
    @store_options
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @errors
    def root_publish(draft: Path, store_url: str, endpoint_url: str | None,
                     as_json: bool) -> None:
        """Upload a root DRAFT signed by a threshold of the old AND the new root keys as
        roots/<N>.json (never replaced) and root.json."""
        print_published(publish_file(draft, store_url, now(), StoreOptions(endpoint_url)),
                        as_json)

