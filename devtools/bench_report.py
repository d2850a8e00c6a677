"""docs/BENCHMARKS.md is shared by several benchmark scripts: each owns one marked section."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

HEADER = """# Benchmarks

Every number here was measured by a script in `scripts/`; each section names the command that
produced it, and all numbers of a section come from one run of that command. Times are wall
clock on a shared 2-core machine: compare numbers within a section, not across runs.
"""


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else HEADER
    if not text.startswith("# Benchmarks"):
        text = HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda m: block, text) if pattern.search(text) else (
        text.rstrip("\n") + "\n\n" + block)
    path.write_text(text)


def intro(title: str, cmd: str, machine: str | None = None) -> list[str]:
    """A section's first lines: its title, the command that produced it and, with ``machine``
    (extra words, or ""), the machine it ran on."""
    lines = [f"## {title}", "", "Produced by:", "", f"    {cmd}", ""]
    if machine is not None:
        lines += [f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}{machine}", ""]
    return lines
