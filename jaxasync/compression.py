# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Top-k / rand-k sparsification, error feedback and sparse updates."""

from jaxasync._src.compression import SparseUpdate as SparseUpdate
from jaxasync._src.compression import add_sparse as add_sparse
from jaxasync._src.compression import compress_tree as compress_tree
from jaxasync._src.compression import ef_compress as ef_compress
from jaxasync._src.compression import flatten_sparse as flatten_sparse
from jaxasync._src.compression import k_from_density as k_from_density
from jaxasync._src.compression import rand_k as rand_k
from jaxasync._src.compression import sparse_to_tree as sparse_to_tree
from jaxasync._src.compression import to_dense as to_dense
from jaxasync._src.compression import top_k as top_k

__all__ = (
    "add_sparse",
    "compress_tree",
    "ef_compress",
    "flatten_sparse",
    "k_from_density",
    "rand_k",
    "sparse_to_tree",
    "SparseUpdate",
    "to_dense",
    "top_k",
)
