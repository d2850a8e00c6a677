"""The publisher's progress bars: :mod:`manifest.progress`, its periodic lines (where stderr is
not a terminal) prefixed ``deltaship-publish:``."""

from __future__ import annotations

import sys
from typing import TextIO

from manifest import progress as _progress
from manifest.progress import human_bytes

__all__ = ["Progress", "human_bytes"]


class Progress(_progress.Progress):
    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        out = stream or sys.stderr

        def line(text: str) -> None:
            out.write(f"deltaship-publish: {text}\n")
            out.flush()

        super().__init__(label, total, out, enabled, line=line)
