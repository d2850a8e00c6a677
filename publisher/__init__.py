"""The publisher: turns model versions into signed, per-group delta releases in a store."""

import os

# The publisher uses numpy elementwise only, never BLAS: OpenBLAS's threads would only spin
# once numpy is imported (measured: 0.1 CPU s of every run on 2 cores). A value set wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .admin import history, init_store, revert
from .release import ReleaseConfig, release
from .summary import ReleaseSummary

__all__ = ["ReleaseConfig", "ReleaseSummary", "history", "init_store", "release", "revert"]
