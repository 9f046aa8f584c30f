"""Where data goes when no folder is named: a per-user cache, as torchvision/torch.hub users expect.

``$MCL_DATA_ROOT`` (or ``data.root=``) wins; otherwise ``$XDG_CACHE_HOME/mcl_lightning/data``, i.e.
``~/.cache/mcl_lightning/data`` on most systems. CIFAR is downloaded there when it is missing and a
network is available.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_data_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mcl_lightning" / "data"
