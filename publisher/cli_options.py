"""Options and helpers shared by the ``deltaship-publish`` commands (:mod:`publisher.cli` and
:mod:`publisher.cli_trust`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from manifest._fields import check_channel
from manifest.cli_errors import exit_on_errors
from manifest.constants import DEFAULT_CHANNEL
from manifest.errors import FormatError, LocalError

from .drafts import DEFAULT_LIFETIMES
from .fleet import parse_percent

__all__ = [
    "MAX_DAYS",
    "F",
    "cache_dir_option",
    "channel_name",
    "channel_option",
    "draft_option",
    "errors",
    "insecure_key_option",
    "keys_option",
    "lifetime_options",
    "now",
    "percent",
    "store_options",
]

F = TypeVar("F", bound=Callable[..., Any])

MAX_DAYS = 36500  # a hundred years: far from the calendar's end (year 9999)

errors = exit_on_errors("deltaship-publish")


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def insecure_key_option(fn: F) -> F:
    return click.option(
        "--insecure-key-permissions", is_flag=True,
        help="Use a private key file that group or others can read (refused by default, as "
        "ssh does: `chmod 600` it instead).",
    )(fn)


def store_options(fn: F) -> F:
    fn = click.option(
        "--endpoint-url", envvar="DELTASHIP_ENDPOINT_URL", metavar="URL",
        help="S3 endpoint (MinIO, Ceph, R2, a local server). Default: AWS_ENDPOINT_URL or AWS.",
    )(fn)
    return click.option(
        "--store", "store_url", required=True, envvar="DELTASHIP_STORE", metavar="URL",
        help="Where releases live: s3://BUCKET/PREFIX, file:///ABS/PATH or a directory. "
        "[env: DELTASHIP_STORE]",
    )(fn)


def keys_option(help_text: str) -> Callable[[F], F]:
    return click.option("--key", "keys", multiple=True,
                        type=click.Path(dir_okay=False, path_type=Path), help=help_text)


def draft_option(fn: F) -> F:
    return click.option(
        "--draft", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
        help="Do not publish: write the unsigned (or partly signed, with --key) documents to "
        "FILE for `deltaship-publish sign FILE --key K` on each key holder's machine, then "
        "`deltaship-publish publish FILE`.",
    )(fn)


def lifetime_options(fn: F) -> F:
    fn = click.option(
        "--timestamp-days", default=DEFAULT_LIFETIMES.timestamp.days, show_default=True,
        type=click.IntRange(1, MAX_DAYS),
        help="Freshness lifetime: devices stop updating this long after the last release or "
        "`refresh` (refresh weekly).",
    )(fn)
    return click.option(
        "--expires-days", default=DEFAULT_LIFETIMES.manifest.days, show_default=True,
        type=click.IntRange(1, MAX_DAYS),
        help="Lifetime of the signed release content (renewed by every release, revert and "
        "`refresh --content`).",
    )(fn)


def channel_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A click callback: a channel name (``--channel``, ``promote --from/--to``)."""
    try:
        return check_channel(value, "")
    except FormatError as e:  # the user's flag: a usage error (exit 2), not the store's data
        raise click.BadParameter(str(e).strip()) from e


def channel_option(fn: F) -> F:
    return click.option(
        "--channel", default=DEFAULT_CHANNEL, show_default=True, envvar="DELTASHIP_CHANNEL",
        callback=channel_name, metavar="NAME",
        help="The channel (stable, beta, ...): its own signed manifest and release records; "
        "objects are shared. [env: DELTASHIP_CHANNEL]",
    )(fn)


def percent(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A click callback: a percentage (``5``, ``0.5``, ``12.25%``) -> basis points."""
    if value is None:
        return None
    try:
        return parse_percent(value, "")
    except LocalError as e:
        raise click.BadParameter(str(e).strip()) from e


def cache_dir_option(fn: F) -> F:
    return click.option(
        "--cache-dir", type=click.Path(file_okay=False, path_type=Path),
        help="Where base versions are cached (default $XDG_CACHE_HOME/deltaship/publisher, "
        "else ~/.cache/deltaship/publisher).",
    )(fn)


def exclude_option(fn: F) -> F:
    return click.option(
        "--exclude", multiple=True, metavar="GLOB",
        help="Leave out the non-tensor files whose path in MODEL_DIR matches GLOB "
        "(shell-style; 'original/' means everything under original/, as the Hugging Face "
        "Hub's ignore_patterns): e.g. --exclude 'original/' --exclude '*.pth'. Repeatable.",
    )(fn)
