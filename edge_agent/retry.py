"""Compatibility re-export; removed when the architecture branches merge.

The retry policy is now :mod:`manifest.storage.retry`.
"""

from manifest.storage.retry import RetryPolicy, RetryState

__all__ = ["RetryPolicy", "RetryState"]
