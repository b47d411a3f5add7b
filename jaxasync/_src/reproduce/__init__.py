"""Cheap reproductions of the five papers' claims, one module each (see :mod:`.common`).

``REPRODUCTIONS`` maps a paper's key to its ``reproduce(quick=False, progress=True, ...) -> Report``;
each module is imported on the first call, so importing this package loads no reproduction.
:func:`reproduce` runs one by name (the CLI's ``jaxasync reproduce NAME`` goes through it).
"""

from __future__ import annotations

import importlib
import os

from jaxasync._src.reproduce.common import Report

_NAMES = ("rfast", "dasgd", "asgrad", "elastic", "cluster")


def _lazy(name):
    def run(**kwargs):
        return importlib.import_module(f"jaxasync._src.reproduce.{name}").reproduce(**kwargs)

    run.__name__ = f"reproduce_{name}"
    run.__doc__ = f"Runs the {name} reproduction (see ``jaxasync._src.reproduce.{name}.reproduce``)."
    return run


REPRODUCTIONS = {name: _lazy(name) for name in _NAMES}


def reproduce(
    name: str,
    *,
    quick: bool = False,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    **kwargs,
) -> Report:
    """Runs one paper's cheap reproduction in the simulator and returns its report.

    Args:
      name: the paper's key, one of ``rfast``, ``dasgd``, ``asgrad``, ``elastic``, ``cluster``.
      quick: the small smoke-test version (seconds to a minute); its checks are relaxed sanity checks,
        not the acceptance targets.
      out: when given, the directory that receives ``<name>.json`` (every number) and ``<name>.png``
        (the curves), as ``jaxasync reproduce NAME --out DIR`` writes them; the paths end up in
        ``report.files``.
      progress: draw a progress bar on stderr when it is a terminal.
      **kwargs: passed on to the paper's own ``reproduce`` (e.g. ``seeds=`` for ``asgrad``).

    Returns:
      A :class:`Report`: ``report.table()`` is the results table with a PASS/FAIL line per target,
      ``report.passed`` whether every target was met, ``report.save(out)`` writes the files.

    Example:
      >>> report = jaxasync.reproduce("asgrad", quick=True, out="results")  # doctest: +SKIP
      >>> print(report.table()); report.passed  # doctest: +SKIP
    """
    if name not in REPRODUCTIONS:
        raise ValueError(f"unknown reproduction {name!r}; choose from {', '.join(REPRODUCTIONS)}")
    report = REPRODUCTIONS[name](quick=quick, progress=progress, **kwargs)
    if out is not None:
        report.save(out)
    return report
