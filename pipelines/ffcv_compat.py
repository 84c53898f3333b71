"""Everything fastssl does to ffcv's internals, in one place.

ffcv 1.0.x has two process-wide side effects on torch's intra-op thread count:

- ``ffcv/pipeline/compiler.py`` calls ``torch.set_num_threads(1)`` at import time, so a
  trainer that chose its threads before the first ``import ffcv`` computed on one thread
  (issue 12: every CPU run on 1 of 2 cores);
- ``Compiler.set_num_threads`` sets torch's count again every epoch, from the loader thread.

:func:`import_ffcv` imports it with torch's count kept, and patches the second away (numba's
thread count, which ffcv's decoders use, is still set).
"""
from __future__ import annotations

import os

import torch

FFCV_INSTALL = ("ffcv is not installed: apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && "
                "pip install 'fastssl[ffcv]'")
TESTED_VERSIONS = ("1.0.",)  # the internals patched below are those of ffcv 1.0.x


def import_ffcv():
    """``import ffcv`` without changing torch's thread count; returns the module (ImportError names the install)."""
    n = torch.get_num_threads()
    try:
        import ffcv
        from ffcv.pipeline import compiler as ffcv_compiler
    except ImportError as e:
        raise ImportError(FFCV_INSTALL) from e
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    import importlib.metadata as md

    try:  # ffcv 1.0.2's own __version__ still says 0.0.3rc1: ask the installed distribution
        version = md.version("ffcv")
    except md.PackageNotFoundError:
        version = ""
    if version and not version.startswith(TESTED_VERSIONS):
        import warnings

        warnings.warn(f"ffcv {version} is untested with fastssl (tested: {TESTED_VERSIONS}); its loader internals "
                      f"may have moved", stacklevel=2)
    _keep_torch_threads(ffcv_compiler)
    return ffcv


def _keep_torch_threads(ffcv_compiler) -> None:
    """Make ffcv's ``Compiler.set_num_threads`` set numba's threads only.

    Upstream also calls ``torch.set_num_threads(workers)`` (process-wide) every epoch, from
    its loader thread; with the decoders busy on the same cores that oversubscribes the CPU
    and undoes the trainer's own choice of torch threads.
    """
    if getattr(ffcv_compiler.Compiler, "_fastssl_patched", False):
        return

    def set_num_threads(cls, n):
        n = n if n >= 1 else (os.cpu_count() or 1)
        cls.num_threads = n
        ffcv_compiler.set_num_threads(n)  # numba's

    ffcv_compiler.Compiler.set_num_threads = classmethod(set_num_threads)
    ffcv_compiler.Compiler._fastssl_patched = True
