"""Builds the native shared-memory core; all other metadata lives in pyproject.toml."""

import cffi  # noqa: F401  (fail loudly here if the build requirement is missing)
from setuptools import setup

setup(cffi_modules=["jaxasync/_src/native_build.py:ffibuilder"])
