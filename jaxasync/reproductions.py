# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""The five papers' cheap reproductions, runnable from Python as from ``jaxasync reproduce NAME``.

``reproduce(name, quick=False, out=None)`` runs one (``rfast``, ``dasgd``, ``asgrad``, ``elastic``,
``cluster``) in the simulator and returns a :class:`Report` (``table()``, ``passed``, ``checks``,
``rows``, ``save(out)`` -> ``<out>/<name>.json`` and ``.png``); ``REPRODUCTIONS`` maps each name to its
function. A reproduction's module (and jax) is imported on its first run.
"""

from jaxasync._src.reproduce import REPRODUCTIONS as REPRODUCTIONS
from jaxasync._src.reproduce import reproduce as reproduce
from jaxasync._src.reproduce.common import Check as Check
from jaxasync._src.reproduce.common import Report as Report

__all__ = (
    "REPRODUCTIONS",
    "Check",
    "Report",
    "reproduce",
)
