"""The publisher: turns model versions into signed, per-group delta releases in a store."""

from .release import ReleaseConfig, ReleaseSummary, init_store, release, revert

__all__ = ["ReleaseConfig", "ReleaseSummary", "init_store", "release", "revert"]
