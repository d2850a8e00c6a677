"""Serving the agent's live version: the hot-swap API, the reference model server and its model.

``edge_agent`` itself is the update daemon; this subpackage is what a model server uses:

* :class:`LiveModel` (:mod:`.live`): the live weights of a model directory, swapped whole when
  the agent switches ``current``; :class:`Weights` snapshots of :class:`Tensor` objects and the
  group loaders (:mod:`.weights`); :func:`to_float32` for BF16/F16/FP8 tensors (:mod:`.dtypes`).
* :mod:`.moe_model`: the NumPy mixture-of-experts forward pass of the reference server.
* :mod:`.server`: the reference model server (aiohttp), run by ``deltaship-agent serve``.

Importing this package loads neither aiohttp nor the model: import :mod:`.server` and
:mod:`.moe_model` themselves.
"""

from .dtypes import FLOAT32_DTYPES, to_float32
from .live import LiveModel
from .weights import (
    FileIdentity,
    Group,
    GroupLoader,
    Tensor,
    Weights,
    load_version,
    map_group,
    read_group,
)

__all__ = [
    "FLOAT32_DTYPES",
    "FileIdentity",
    "Group",
    "GroupLoader",
    "LiveModel",
    "Tensor",
    "Weights",
    "load_version",
    "map_group",
    "read_group",
    "to_float32",
]
