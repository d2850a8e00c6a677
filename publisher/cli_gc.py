"""``deltaship-publish gc``: garbage collection on the command line (the logic:
:mod:`publisher.gc`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from manifest.progress import human_bytes
from manifest.storage.store import StoredObject, StoreOptions, open_store

from .cli_options import errors, store_options
from .gc import GcResult, Selection, collect, parse_duration
from .progress import Progress

__all__ = ["register"]

PROGRESS_FROM = 1000  # objects to delete from which a progress line is shown


def register(main: click.Group) -> None:
    @main.command("gc")
    @store_options
    @click.option("--keep", required=True, type=int, metavar="N",
                  help="Keep the objects of the last N releases of every channel (in the "
                  "order `history` lists them), besides each channel's current release and "
                  "rollout candidate.")
    @click.option("--grace", default="24h", show_default=True, metavar="DURATION",
                  help="Never delete an object written less than this long ago (a release or "
                  "draft in progress): 90s, 30m, 24h, 7d, 2w. Longer than drafts wait for "
                  "signatures.")
    @click.option("--dry-run", is_flag=True, help="Print what would be deleted; delete nothing.")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @errors
    def gc_cmd(store_url: str, endpoint_url: str | None, keep: int, grace: str, dry_run: bool,
               as_json: bool) -> None:
        """Delete store objects no kept release references (docs/FORMAT.md §1).

        Kept, for every channel: the objects of its current release and rollout
        candidate, of its last --keep releases and of the releases those two patched from,
        and every object younger than --grace. Everything else under objects/ is deleted;
        manifests and release records are never touched, but a version whose index is
        deleted can no longer be reverted to. Keep N at least `release --deltas-from`.
        Nothing is deleted when a manifest or record cannot be read or changed meanwhile.

        \b
        Examples:
          deltaship-publish gc --store s3://models/llm --keep 5 --dry-run
          deltaship-publish gc --store s3://models/llm --keep 5 --json
        """
        grace_td = parse_duration(grace)
        store = open_store(store_url, StoreOptions(endpoint_url))
        bars: list[Progress] = []

        def on_plan(selection: Selection) -> None:
            if not dry_run and len(selection.delete) >= PROGRESS_FROM:
                # --json: stdout is the JSON alone (where there is no terminal, progress
                # lines go to stdout), so no progress, as `release --json`.
                bars.append(Progress("deleting", sum(o.size for o in selection.delete),
                                     enabled=False if as_json else None))

        def on_delete(o: StoredObject) -> None:
            if not as_json:
                click.echo(f"deleted {o.key} ({human_bytes(o.size)})")
            for bar in bars:
                bar.advance(o.size)

        try:
            # The exact time, not now()'s whole second (for signed documents): an object
            # written earlier in this second is not "in the future", younger than any grace.
            result = collect(store, datetime.now(UTC), keep, grace_td, dry_run=dry_run,
                             on_plan=on_plan, on_delete=on_delete)
        finally:
            for bar in bars:
                bar.close()
        _print(result, as_json)


def _print(r: GcResult, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    if r.dry_run:
        for o in r.selection.delete:
            why = " (lost race)" if o.key in r.selection.lost else ""
            click.echo(f"would delete {o.key} ({human_bytes(o.size)}){why}")
    releases = sorted({(k.channel, k.version) for k in r.kept})
    verb = "would free" if r.dry_run else "freed"
    click.echo(f"{'would delete' if r.dry_run else 'deleted'} {len(r.selection.delete)} "
               f"object(s), {verb} {r.freed} bytes ({human_bytes(r.freed)}); kept "
               f"{r.reachable} object(s) of {len(releases)} release(s) in "
               f"{len({c for c, _ in releases})} channel(s)")
    lost = r.selection.lost
    if lost:
        young = sum(1 for o in r.selection.young if o.key in lost)
        click.echo(f"lost races (objects no release ever referenced): {len(lost)}, "
                   f"{young} of them within the grace period")
    if r.selection.pending:
        click.echo(f"kept {len(r.selection.pending)} older object(s) that a release index "
                   "younger than the grace period names (a draft waiting for signatures)")
    if r.selection.young:
        click.echo(f"kept {len(r.selection.young)} unreferenced object(s) younger than the "
                   "grace period")
