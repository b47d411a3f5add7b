"""The README's Python examples run as written (so the README cannot drift from the API)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _blocks():
    with open(README) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write files (traces, plots)
    exec(compile(_blocks()[index], f"README.md[python block {index}]", "exec"), {})


def test_readme_has_examples_per_layer():
    assert len(_blocks()) >= 4
