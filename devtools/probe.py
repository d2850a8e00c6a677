"""``python -m devtools.probe VERSION_DIR``: the reference model's acceptance test as a command.

Loads a version directory as the reference server would and runs its probe (a fixed input that
must give finite logits); exits 0 when the version is servable, 1 with one line otherwise.
Used as a ``--health-command`` by devices that run no model server (the demo's fleet).
"""

from __future__ import annotations

import sys
from pathlib import Path

from edge_agent.serving.moe_model import MoEModel
from edge_agent.serving.weights import load_version
from manifest.errors import DeltashipError


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m devtools.probe VERSION_DIR", file=sys.stderr)
        return 2
    try:
        MoEModel.build(load_version(Path(argv[0]))).probe()
    except DeltashipError as e:
        print(f"probe: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
