"""The publisher: turns model versions into signed, per-group delta releases in a store."""

from .admin import history, init_store, revert
from .release import ReleaseConfig, release
from .summary import ReleaseSummary

__all__ = ["ReleaseConfig", "ReleaseSummary", "history", "init_store", "release", "revert"]
