"""``deltaship-agent``: the device-side command line (the update loop is being built)."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Keep a device's model at the release its trusted manifest names."""
