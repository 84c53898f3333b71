"""Logging for fastssl: library modules log, only the command-line tools print.

Every library module takes ``log = logging.getLogger(__name__)`` (names under
``fastssl``), so an application that embeds fastssl routes or silences them
with the standard :mod:`logging` machinery. The command-line tools call
:func:`configure` once: plain ``fastssl: message`` lines on stderr, warnings and
errors only under ``--quiet`` or ``FASTSSL_QUIET=1``. Progress bars
(:mod:`fastssl.progress`) are not log records and keep their own switch.
"""
from __future__ import annotations

import logging
import os
import sys

ROOT = "fastssl"


class _Plain(logging.Formatter):
    """``fastssl: msg`` for INFO, ``fastssl: warning: msg`` above it: one line a user can read or grep."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"{ROOT}: error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"{ROOT}: warning: {msg}"
        return f"{ROOT}: {msg}"


class _StderrNow(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (a test's capture, a redirected CLI)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def quiet_from_env() -> bool:
    return os.environ.get("FASTSSL_QUIET", "").strip().lower() not in ("", "0", "false", "no")


def configure(quiet: bool | None = None, level: int | None = None) -> logging.Logger:
    """Route the ``fastssl`` loggers to stderr as plain lines (idempotent; the CLIs call it).

    ``quiet`` (default: ``FASTSSL_QUIET``) keeps warnings and errors only. A handler the
    application installed on the ``fastssl`` logger is left alone.
    """
    logger = logging.getLogger(ROOT)
    if quiet is None:
        quiet = quiet_from_env()
    logger.setLevel(level if level is not None else (logging.WARNING if quiet else logging.INFO))
    if not any(getattr(h, "_fastssl", False) for h in logger.handlers):
        handler = _StderrNow()
        handler.setFormatter(_Plain())
        handler._fastssl = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        # Records still propagate: the root logger of a CLI process has no handler of its own (nothing
        # prints twice), and an application's or pytest's handlers there keep seeing fastssl's records.
    return logger
