"""Where fastssl keeps what it measured or checked once per machine (one place for every such file)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$FASTSSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastssl`` (default ``~/.cache/fastssl``); not created here.

    Holds the CPU weight-gradient choices (``models/cpu_conv.py``) and the DALI back-end's verdicts
    on image folders (``pipelines/dali_backend.py``). Deleting it loses nothing but time.
    """
    if os.environ.get("FASTSSL_CACHE_DIR"):
        return Path(os.environ["FASTSSL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastssl"
