"""Progress lines (found in review of the command lines): a job that has moved no byte yet
(a stalled store) does not claim to end at once."""

from __future__ import annotations

import io

from manifest.progress import Progress


def test_a_stalled_job_has_an_unknown_eta_not_zero() -> None:
    p = Progress("updating to v2", 1_000_000, stream=io.StringIO(), enabled=False)
    start = p._start
    stalled = " ".join(p.text(start + 30.0).split())
    assert stalled == "updating to v2: 0.0% 0 B/1.0 MB 0 B/s ETA ?", stalled
    p.advance(250_000)
    moving = " ".join(p.text(start + 10.0).split())  # 25 kB/s, 750 kB left: 30 s
    assert moving == "updating to v2: 25.0% 250.0 kB/1.0 MB 25.0 kB/s ETA 30s", moving
    p.advance(750_000)
    done = " ".join(p.text(start + 20.0).split())
    assert done.endswith("100.0% 1.0 MB/1.0 MB 50.0 kB/s ETA 0s"), done
    empty = Progress("hashing", 0, stream=io.StringIO(), enabled=False)
    assert " ".join(empty.text(empty._start + 1.0).split()).endswith("ETA 0s")
