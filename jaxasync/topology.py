# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Communication graphs, mixing weights, common-root and spectral checks."""

from jaxasync._src.topology import Graph as Graph
from jaxasync._src.topology import check_column_stochastic as check_column_stochastic
from jaxasync._src.topology import check_common_root as check_common_root
from jaxasync._src.topology import check_doubly_stochastic as check_doubly_stochastic
from jaxasync._src.topology import check_row_stochastic as check_row_stochastic
from jaxasync._src.topology import complete as complete
from jaxasync._src.topology import directed_ring as directed_ring
from jaxasync._src.topology import effective_step_factor as effective_step_factor
from jaxasync._src.topology import exponential as exponential
from jaxasync._src.topology import from_adjacency as from_adjacency
from jaxasync._src.topology import from_networkx as from_networkx
from jaxasync._src.topology import in_tree as in_tree
from jaxasync._src.topology import in_weight_table as in_weight_table
from jaxasync._src.topology import metropolis_weights as metropolis_weights
from jaxasync._src.topology import out_tree as out_tree
from jaxasync._src.topology import out_weight_table as out_weight_table
from jaxasync._src.topology import perron_vectors as perron_vectors
from jaxasync._src.topology import pull_weights as pull_weights
from jaxasync._src.topology import push_weights as push_weights
from jaxasync._src.topology import random_geometric as random_geometric
from jaxasync._src.topology import ring as ring
from jaxasync._src.topology import roots_of_spanning_trees as roots_of_spanning_trees
from jaxasync._src.topology import spectral_gap as spectral_gap
from jaxasync._src.topology import star as star
from jaxasync._src.topology import torus as torus

__all__ = (
    "Graph",
    "check_column_stochastic",
    "check_common_root",
    "check_doubly_stochastic",
    "check_row_stochastic",
    "complete",
    "directed_ring",
    "effective_step_factor",
    "exponential",
    "from_adjacency",
    "from_networkx",
    "in_tree",
    "in_weight_table",
    "metropolis_weights",
    "out_tree",
    "out_weight_table",
    "perron_vectors",
    "pull_weights",
    "push_weights",
    "random_geometric",
    "ring",
    "roots_of_spanning_trees",
    "spectral_gap",
    "star",
    "torus",
)
