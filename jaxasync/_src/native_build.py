"""cffi builder for `jaxasync._native`, the native shared-memory core.

The cdef is derived from the public header `csrc/jaxasync.h`: the region between
`/* cdef-begin */` and `/* cdef-end */`, with preprocessor lines dropped except
integer `#define`s, which become `#define NAME ...` so cffi reads their values
from the compiled code. The header is therefore the single source of truth; a
test checks the compiled module against it.

Run by setuptools through `setup.py` (`cffi_modules`), or directly:
`python jaxasync/_src/native_build.py` builds the module in place.
"""

from __future__ import annotations

import pathlib
import re

import cffi

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HEADER = CSRC / "jaxasync.h"
SOURCES = sorted(CSRC.glob("*.c"))

_BEGIN, _END = "/* cdef-begin */", "/* cdef-end */"
_DEFINE = re.compile(r"#define\s+(JA_\w+)\s+\S+")


def cdef_from_header(text: str) -> str:
    """Returns the cffi cdef for the marked region of the header text."""
    start, end = text.index(_BEGIN) + len(_BEGIN), text.index(_END)
    lines = []
    for line in text[start:end].splitlines():
        if line.lstrip().startswith("#"):
            define = _DEFINE.match(line.strip())
            if define:
                lines.append(f"#define {define.group(1)} ...")
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


CDEF = cdef_from_header(HEADER.read_text())

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "jaxasync._native",
    '#include "jaxasync.h"',
    sources=[str(p.relative_to(ROOT)) for p in SOURCES],
    include_dirs=[str(CSRC.relative_to(ROOT))],
    depends=[str(p.relative_to(ROOT)) for p in CSRC.glob("*.h")],
    # -O3 vectorizes the racy loops. No -march=native: the module must run on
    # any machine of its architecture; the hot racy loop carries its own
    # AVX2 / AVX-512 clones, picked at load time (see param_buffer.c).
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["rt"],
)

if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    ffibuilder.compile(verbose=True)
