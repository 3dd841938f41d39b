"""Where fgrpo keeps what it can always rebuild: `FGRPO_CACHE`, default `~/.cache/fgrpo`.

The tiny model's warm start and a node's partitions live here. Nothing in it is
a user's work: deleting the folder only costs the time to rebuild, except
`checkpoint.key` (`fgrpo.federation.signing`): without it, the runs it signed
can no longer be resumed.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("FGRPO_CACHE", Path.home() / ".cache" / "fgrpo"))
