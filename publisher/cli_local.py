"""``deltaship-publish inspect | cache info | cache clear``: the commands that need no store."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cache import PublisherCache, default_cache_dir
from .cli_options import cache_dir_option, errors, exclude_option
from .grouping import assign_groups, parse_pattern
from .model_dir import open_model
from .progress import human_bytes

__all__ = ["register"]


def register(main: click.Group) -> None:
    """Add ``inspect`` and ``cache`` to ``deltaship-publish``."""

    @main.command("inspect")
    @click.argument("model_dir", type=click.Path(path_type=Path))
    @click.option("--group-pattern", "patterns", multiple=True, metavar="REGEX",
                  help="Grouping rule tried before the defaults: a regex with named captures.")
    @exclude_option
    @click.option("--json", "as_json", is_flag=True, help="Print the group map as JSON.")
    @errors
    def inspect_cmd(model_dir: Path, patterns: tuple[str, ...], exclude: tuple[str, ...],
                    as_json: bool) -> None:
        """Show how MODEL_DIR's tensors are grouped (one file and one patch per group), and
        which other files a release ships and which hidden or --exclude'd ones it skips."""
        rules = [parse_pattern(p) for p in patterns]
        with open_model(model_dir, exclude) as model:
            groups = assign_groups(model.tensors, rules)
            sizes = {g: sum(model.tensors[t].info.nbytes for t in ts) for g, ts in groups.items()}
            if as_json:
                click.echo(json.dumps({"groups": [{"name": g, "bytes": sizes[g], "tensors": ts}
                                                  for g, ts in groups.items()],
                                       "tensor_files": model.tensor_files,
                                       "files": model.other_files,
                                       "skipped_files": model.skipped_files,
                                       "excluded_files": model.excluded_files}, indent=2))
                return
            click.echo(f"{len(groups)} groups, {len(model.tensors)} tensors, "
                       f"{len(model.other_files)} other files")
            for g, ts in groups.items():
                click.echo(f"  {g:<40}{len(ts):>4} tensors {human_bytes(sizes[g]):>10}")
            for f in model.other_files:
                click.echo(f"  file {f}")
            for f in model.skipped_files:
                click.echo(f"  skipped (hidden) {f}")
            for f in model.excluded_files:
                click.echo(f"  skipped (--exclude) {f}")


    @main.group("cache")
    def cache_group() -> None:
        """Show or clear the local cache of base versions.

        `release` rebuilds the base versions it makes patches from here and trims the cache to
        --cache-max-bytes (default 4G) afterwards, least recently used first.
        """


    @cache_group.command("info")
    @cache_dir_option
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @errors
    def cache_info(cache_dir: Path | None, as_json: bool) -> None:
        """Show where the cache is and how much it holds."""
        usage = PublisherCache(cache_dir or default_cache_dir()).usage()
        if as_json:
            click.echo(json.dumps(usage.to_dict()))
        else:
            click.echo(f"{usage.path}: {usage.files} files, {human_bytes(usage.total_bytes)}")


    @cache_group.command("clear")
    @cache_dir_option
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @errors
    def cache_clear(cache_dir: Path | None, as_json: bool) -> None:
        """Remove everything in the cache (refused while a release is using it)."""
        removed = PublisherCache(cache_dir or default_cache_dir()).clear()
        if as_json:
            click.echo(json.dumps({**removed.to_dict(), "removed": True}))
        else:
            click.echo(f"removed {removed.files} files, {human_bytes(removed.total_bytes)} from "
                       f"{removed.path}")
