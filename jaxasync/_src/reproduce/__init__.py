"""Cheap reproductions of the five papers' claims, one module each (see :mod:`.common`)."""

import importlib

_NAMES = ("rfast", "dasgd", "asgrad", "elastic", "cluster")


def _lazy(name):
    def run(**kwargs):
        return importlib.import_module(f"jaxasync._src.reproduce.{name}").reproduce(**kwargs)

    run.__name__ = f"reproduce_{name}"
    return run


REPRODUCTIONS = {name: _lazy(name) for name in _NAMES}
