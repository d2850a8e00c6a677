"""``deltaship-publish``: the command line of the release path.

Maps flags and environment onto explicit configuration, calls :mod:`publisher.release`, and
turns every :class:`manifest.errors.DeltashipError` into one line on stderr and its exit code.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import click

from manifest.cli_errors import OneLineGroup, exit_codes_help
from manifest.errors import FormatError, LocalError
from manifest.expiry import expiries as expiry_list
from manifest.metadata import check_version
from manifest.storage.store import StoreOptions

from .admin import ROLES, history, init_store, revert, role_keys
from .cache import DEFAULT_CACHE_MAX_BYTES, parse_size
from .cli_fleet import register as register_fleet
from .cli_gc import register as register_gc
from .cli_local import register as register_local
from .cli_options import (
    MAX_DAYS,
    F,
    cache_dir_option,
    channel_option,
    draft_option,
    errors,
    exclude_option,
    insecure_key_option,
    lifetime_options,
    now,
    percent,
    store_options,
)
from .cli_trust import print_draft_status as _print_draft_status
from .cli_trust import print_published, register
from .drafts import Lifetimes
from .fleet import percent_text
from .keys import generate_key_files
from .progress import human_bytes
from .release import ReleaseConfig, release
from .summary import ReleaseSummary

EXIT_NOTES = ("2 also covers a bad model, key, store URL, credentials or bucket; 5 here: a "
              "concurrent release or revert changed the store first.")
MAX_ROOT_DAYS = MAX_DAYS
_insecure_key_option = insecure_key_option
_store_options = store_options
_errors = errors
_now = now
_draft_option = draft_option
_lifetime_options = lifetime_options


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


@click.group(cls=OneLineGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="deltaship")
def main() -> None:
    """Publish signed, per-layer and per-expert delta releases of safetensors models.

    \b
    Typical use:
      deltaship-publish keygen --out keys/ --name release
      deltaship-publish init --store s3://models/llm --key keys/release.key
      deltaship-publish release ./checkpoint-v1 --store s3://models/llm --version v1 \\
          --key keys/release.key
      deltaship-publish release ./checkpoint-v2 --store s3://models/llm --version v2 \\
          --key keys/release.key
      deltaship-publish history --store s3://models/llm

    S3 credentials and region come from the standard AWS environment and config files
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL).
    """


@main.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for NAME.key (private, mode 0600) and NAME.pub.")
@click.option("--name", default="release", show_default=True, help="Base name of the key files.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_errors
def keygen(out_dir: Path, name: str, as_json: bool) -> None:
    """Create an ed25519 signing key pair. Existing files are never overwritten.

    Keep NAME.key secret (an offline machine or a CI secret); NAME.key is what
    `init`, `release` and `revert` take with --key.
    """
    priv, pub, keyid = generate_key_files(out_dir, name)
    if as_json:
        click.echo(json.dumps({"private": str(priv), "public": str(pub), "keyid": keyid}))
    else:
        click.echo(f"private key: {priv} (keep it secret)")
        click.echo(f"public key:  {pub}\nkey id:      {keyid}")


def _thresholds(ctx: click.Context, param: click.Parameter,
                value: tuple[str, ...]) -> dict[str, int]:
    """``--threshold N`` (every role) or ``--threshold ROLE=N`` (repeatable)."""
    out: dict[str, int] = {}
    for item in value:
        role, _, n = item.rpartition("=")
        roles = [role] if role else list(ROLES)
        if role and role not in ROLES:
            raise click.BadParameter(f"{role!r} is not a role ({', '.join(ROLES)})")
        try:
            count = int(n)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not N or ROLE=N") from None
        if count < 1:
            raise click.BadParameter(f"{item!r}: a threshold is at least 1")
        for r in roles:
            out[r] = count
    return out


def _key_option(name: str, help_text: str) -> Callable[[F], F]:
    return click.option(name, multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                        help=help_text)


@main.command()
@_store_options
@_key_option("--key", "Private key for every role (small set-ups; repeatable).")
@_key_option("--root-key", "Private key of the root role, which signs trust roots: keep it "
             "offline (repeatable).")
@_key_option("--release-key", "Key of the release role, which signs releases, reverts and "
             "what is current: private or public half (repeatable).")
@_key_option("--timestamp-key", "Key of the online timestamp role, which only re-signs "
             "freshness (`refresh`): private or public half (repeatable). Default: the "
             "release keys.")
@click.option("--threshold", "thresholds", multiple=True, callback=_thresholds,
              metavar="[ROLE=]N", help="Signatures required: N for every role, or ROLE=N "
              "(root, release, timestamp); repeatable. Default 1.")
@click.option("--expires-days", default=365, show_default=True,
              type=click.IntRange(min=1, max=MAX_ROOT_DAYS), help="Lifetime of the trust root.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a local copy of the trust root here (for devices to pin).")
@_insecure_key_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_errors
def init(store_url: str, endpoint_url: str | None, key: tuple[Path, ...],
         root_key: tuple[Path, ...], release_key: tuple[Path, ...],
         timestamp_key: tuple[Path, ...], thresholds: dict[str, int], expires_days: int,
         out_file: Path | None, insecure_key_permissions: bool, as_json: bool) -> None:
    """Write the trust root (roles, keys, thresholds, version 1, expiry) to a new store.

    \b
    Roles:
      root       signs trust roots (rotation: `root edit/sign/publish`); keep offline
      release    signs releases, reverts and what is current
      timestamp  online; only re-signs freshness (`refresh`, weekly)
    --key gives a key every role; a role given no key of its own uses the release keys.
    The root is signed by the root keys (private files needed); release and timestamp keys
    may be public halves. Devices pin a copy (`deltaship-agent init --trust root.json`).
    Refuses to overwrite an existing root.
    """
    by_role = role_keys(key, {"root": root_key, "release": release_key,
                              "timestamp": timestamp_key})
    result = init_store(store_url, by_role, thresholds, _now(),
                        expires=timedelta(days=expires_days), options=StoreOptions(endpoint_url),
                        insecure_key_permissions=insecure_key_permissions)
    url, data, root = result.url, result.data, result.root
    for other in result.shared_with:  # warnings: stderr, one line each
        shared = sorted(set(other.keyids) & set(root.keys))
        click.echo(f"deltaship-publish: warning: key {shared[0][:16]} also signs {other.url} "
                   f"(repository {other.repository_id}); devices tell the two stores apart only "
                   "by repository id: prefer one key per store", err=True)
    if out_file is not None:
        try:
            out_file.write_bytes(data)
        except OSError as e:  # the store is initialised now: say so, and where the root is
            raise LocalError(f"the trust root was written to {url}, but its copy {out_file} "
                             f"was not ({e.strerror}): copy {url} instead (a new `init` "
                             "refuses an initialised store)") from e
    if as_json:
        click.echo(json.dumps({"root": url, "repository_id": root.repository_id,
                               "keyids": list(root.keys),
                               "roles": {n: r.to_dict() for n, r in root.roles.items()},
                               "threshold": root.roles["release"].threshold,
                               "expires": root.to_dict()["expires"],
                               "copy": str(out_file) if out_file else None,
                               "key_shared_with": [o.url for o in result.shared_with]}))
        return
    click.echo(f"trust root v{root.version} written to {url}")
    click.echo(f"  repository id: {root.repository_id}, expires {root.expires:%Y-%m-%d}")
    for name, role in root.roles.items():
        click.echo(f"  {name:<10} {role.threshold} of {len(role.keyids)} key(s): "
                   + ", ".join(k[:16] for k in role.keyids))
    where = out_file or url
    click.echo(f"devices pin this root: copy {where} to each device and run\n"
               f"  deltaship-agent init --store {store_url} --trust root.json --model-dir DIR")


@main.command("release")
@click.argument("model_dir", type=click.Path(path_type=Path))
@_store_options
@channel_option
@click.option("--version", "version", required=True, help="Name of the new version (e.g. v2).")
@click.option("--rollout", "rollout_bp", callback=percent, metavar="PERCENT",
              help="Stage it: the new version is the candidate for PERCENT of the channel's "
              "devices (e.g. 1 or 0.5), the current one stays the fallback (`rollout`).")
@click.option("--key", "keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Private signing key: release and timestamp keys, enough for their "
              "thresholds (repeatable).")
@_draft_option
@_lifetime_options
@click.option("--deltas-from", default=3, show_default=True, type=click.IntRange(min=0),
              help="Compute patches from this many most recent releases.")
@click.option("--index-deltas", default=1, show_default=True, type=click.IntRange(0, 8),
              metavar="N", help="Also ship the release index as deltas from the indexes of "
              "the channel's current release (and rollout candidate) and its N most recent "
              "releases, so an updating device downloads a few hundred bytes of metadata "
              "(0: none; the zstd-compressed index is always written).")
@click.option("--checkpoint-every", default=0, show_default=True, type=click.IntRange(min=0),
              metavar="N", help="Also compute patches from the 4 most recent checkpoint "
              "releases, every N-th release of the channel (0: none), so devices far behind "
              "still get patches.")
@click.option("--group-pattern", "patterns", multiple=True, metavar="REGEX",
              help="Grouping rule tried before the defaults: a regex with named captures.")
@exclude_option
@click.option("--level", default=3, show_default=True, type=click.IntRange(1, 22),
              help="zstd level for tensor data and for non-tensor files over 16 MiB "
                   "(smaller files are coded at level 19).")
@click.option("--workers", type=click.IntRange(min=1), help="Threads (default: CPU count).")
@cache_dir_option
@click.option("--cache-max-bytes", callback=_size, default=str(DEFAULT_CACHE_MAX_BYTES),
              metavar="SIZE", show_default="4G",
              help="Trim the cache to this size after the release, least recently used base "
              "files first (bytes, or with K, M, G, T; 0 keeps nothing).")
@_insecure_key_option
@click.option("--dry-run", is_flag=True, help="Compute and report, upload nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_errors
def release_cmd(model_dir: Path, store_url: str, endpoint_url: str | None, channel: str,
                version: str, rollout_bp: int | None, keys: tuple[Path, ...],
                draft: Path | None, expires_days: int, timestamp_days: int, deltas_from: int,
                index_deltas: int, checkpoint_every: int, patterns: tuple[str, ...],
                exclude: tuple[str, ...], level: int, workers: int | None,
                cache_dir: Path | None, cache_max_bytes: int, insecure_key_permissions: bool,
                dry_run: bool, as_json: bool) -> None:
    """Release MODEL_DIR as VERSION: per-group patches, signed index and manifest.

    MODEL_DIR holds *.safetensors (one file, or shards with model.safetensors.index.json)
    and any other files (config.json, tokenizer files), which ship too; symlinks to files
    are followed (a Hugging Face cache snapshot works), hidden files and those matching
    --exclude are skipped, and the summary lists what was read, shipped and skipped.
    Tensors are grouped per routed expert, per layer, and embeddings/norm/heads (see
    `inspect`). For each changed
    group a full object and patches from the last --deltas-from releases are uploaded;
    unchanged groups cost nothing. The summary shows, per base version, what a device at that
    version downloads.

    With --draft FILE the objects are uploaded but nothing is made current: the manifest
    and release record wait in FILE for `deltaship-publish sign FILE --key K` on each key
    holder's machine, then `deltaship-publish publish FILE`.
    """
    if dry_run and draft is not None:  # a dry run writes nothing: the draft would be lost
        raise click.UsageError("--dry-run and --draft do not go together: a dry run uploads "
                               "and writes nothing")
    try:
        check_version(version, "--version")
    except FormatError as e:  # the user's flag, not data from the store
        raise LocalError(str(e)) from e
    cfg = ReleaseConfig(model_dir, store_url, version, keys, deltas_from, dry_run, patterns,
                        exclude, StoreOptions(endpoint_url), level=level,
                        progress=False if as_json else None, cache_max_bytes=cache_max_bytes,
                        insecure_key_permissions=insecure_key_permissions, draft=draft,
                        lifetimes=Lifetimes(timedelta(days=expires_days),
                                            timedelta(days=timestamp_days)),
                        channel=channel, rollout_basis_points=rollout_bp,
                        checkpoint_every=checkpoint_every, index_deltas=index_deltas)
    if workers:
        cfg = dataclasses.replace(cfg, workers=workers)
    if cache_dir:
        cfg = dataclasses.replace(cfg, cache_dir=cache_dir)
    summary = release(cfg, _now())
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        _print_summary(summary)


def _print_summary(s: ReleaseSummary) -> None:
    verb = "would release" if s.dry_run else "drafted" if s.draft else "released"
    where = s.store if s.channel == "stable" else f"channel {s.channel} of {s.store}"
    staged = ("" if s.rollout_basis_points is None else
              f", candidate for {percent_text(s.rollout_basis_points)} of devices")
    click.echo(f"{verb} {s.version} to {where} (manifest sequence {s.sequence}{staged})")
    if s.draft:
        _print_draft_status(Path(s.draft), s.draft_missing)
    click.echo(f"  groups changed: {s.groups_changed} of {s.groups_total}; "
               f"files changed: {s.files_changed} of {s.files_total}; "
               f"model {human_bytes(s.model_bytes)}")
    click.echo(f"  {'device at':<14}{'downloads':>12}{'full':>12}{'saved':>8}")
    rows = [(b.version, b.download_bytes, b.full_bytes) for b in s.bases]
    rows.append(("(new device)", s.full_download_bytes, s.full_download_bytes))
    for name, dl, full in rows:
        saved = 100.0 * (1 - dl / full) if full else 0.0
        click.echo(f"  {name:<14}{human_bytes(dl):>12}{human_bytes(full):>12}{saved:>7.1f}%")
    up = "nothing uploaded (dry run)" if s.dry_run else (
        f"uploaded {s.uploaded_objects} objects, {human_bytes(s.uploaded_bytes)}")
    click.echo(f"  {up}; {s.seconds:.1f} s (encoding {s.encode_seconds:.1f} s)")
    click.echo(f"  tensor files read ({len(s.tensor_files)}): {_names(s.tensor_files)}")
    click.echo(f"  other files shipped ({len(s.other_files)}): {_names(s.other_files)}")
    if s.skipped_files:
        click.echo(f"  hidden, not shipped ({len(s.skipped_files)}): "
                   f"{_names(s.skipped_files)}")
    if s.excluded_files:
        click.echo(f"  excluded, not shipped ({len(s.excluded_files)}): "
                   f"{_names(s.excluded_files)}")


def _names(names: tuple[str, ...], limit: int = 12) -> str:
    """Up to ``limit`` names, then how many more (--json lists them all)."""
    if not names:
        return "none"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@main.command("history")
@_store_options
@channel_option
@click.option("--json", "as_json", is_flag=True, help="Print the history as JSON.")
@_errors
def history_cmd(store_url: str, endpoint_url: str | None, channel: str, as_json: bool) -> None:
    """List the releases of a channel, oldest first, marking the current one and a rollout's
    candidate, and when the trust root, the release content and its freshness expire
    (warning when one is near)."""
    now = _now()
    h = history(store_url, now, StoreOptions(endpoint_url), channel)
    ts = h.timestamp
    rollout = ts.manifest.rollout if ts else None
    expiries = expiry_list(h.root, ts, now)
    if as_json:
        click.echo(json.dumps({
            "channel": h.channel, "channels": list(h.channels),
            "rollout": rollout.to_dict() if rollout else None,
            "current": ts.current.version if ts else None,
            "sequence": ts.manifest.sequence if ts else 0,
            "timestamp_sequence": ts.sequence if ts else 0,
            "root_version": h.root.version,
            "expires": {e.name: e.to_dict() for e in expiries},
            "releases": [{"version": e.version, "sequence": e.sequence,
                          "released_at": e.released_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                          "current": e.current, "signed_under_root": e.signed_under}
                         for e in h.entries],
        }, indent=2))
        return
    if not h.entries:
        click.echo("no releases yet" + (f" in channel {channel} (channels with releases: "
                                        f"{', '.join(h.channels) or 'none'})"
                                        if channel != "stable" else ""))
    else:
        click.echo(f"{'':2}{'version':<20}{'sequence':>9}  released")
        for e in h.entries:
            mark = "*" if e.current else "~" if rollout and \
                rollout.candidate.version == e.version else " "
            old = (f"  (signed under root v{e.signed_under})"
                   if e.signed_under and e.signed_under != h.root.version else "")
            click.echo(f"{mark:2}{e.version:<20}{e.sequence:>9}  "
                       f"{e.released_at:%Y-%m-%d %H:%M:%S}Z{old}")
    if ts is not None and ts.manifest.action == "revert":
        click.echo(f"(reverted to {ts.current.version} at sequence {ts.manifest.sequence})")
    if rollout is not None:
        click.echo(f"~ rollout of {rollout.candidate.version}: {rollout.state}, "
                   f"{percent_text(rollout.share(now))} of devices now (`fleet status`)")
    for x in expiries:
        click.echo(f"{x.label:<22}expires {x.at_text} ({x.days_left} days)")
    for x in expiries:
        if x.warning:
            click.echo(f"deltaship-publish: warning: {x.warning}", err=True)


@main.command("revert")
@_store_options
@channel_option
@click.option("--to", "to_version", required=True, help="The released version to make current.")
@click.option("--key", "keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Private signing key: release and timestamp keys, enough for their "
              "thresholds (repeatable).")
@_draft_option
@_lifetime_options
@_insecure_key_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_errors
def revert_cmd(store_url: str, endpoint_url: str | None, channel: str, to_version: str,
               keys: tuple[Path, ...], draft: Path | None, expires_days: int,
               timestamp_days: int, insecure_key_permissions: bool, as_json: bool) -> None:
    """Make an older release current for the whole channel (a rollout in progress ends).

    Publishes a new manifest with a higher sequence number that names the older release, so
    devices follow it like any update and replay protection stays intact. With --draft FILE
    the manifest waits for `sign` and `publish`.
    """
    p = revert(store_url, to_version, keys, _now(), options=StoreOptions(endpoint_url),
               lifetimes=Lifetimes(timedelta(days=expires_days), timedelta(days=timestamp_days)),
               insecure_key_permissions=insecure_key_permissions, draft=draft, channel=channel)
    print_published(p, as_json)


register(main)
register_fleet(main)
register_gc(main)
register_local(main)
main.help = (main.help or "") + "\n\n" + exit_codes_help(EXIT_NOTES)
