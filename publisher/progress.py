"""The publisher's progress: :mod:`manifest.progress`. On a terminal (stderr) one line
redrawn in place; elsewhere a ``deltaship-publish: hashing: ...`` line every few seconds on
stdout, beside the release summary, so that a failure stays one line on stderr."""

from __future__ import annotations

import sys
from typing import TextIO

from manifest import progress as _progress
from manifest.progress import human_bytes

__all__ = ["Progress", "human_bytes"]


class Progress(_progress.Progress):
    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        def line(text: str) -> None:
            out = stream or sys.stdout
            out.write(f"deltaship-publish: {text}\n")
            out.flush()

        super().__init__(label, total, stream or sys.stderr, enabled, line=line)
