# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Asynchronous and decentralized algorithms as node programs (see :class:`jaxasync.NodeProgram`).

Each factory returns a program that every executor runs unchanged: ``jaxasync.simulate`` and the
real multi-process runtime. Local steps take an Optax optimizer where the paper allows one.
"""

from jaxasync._src.algorithms.asgrad import AsGradState as AsGradState
from jaxasync._src.algorithms.asgrad import asgrad as asgrad
from jaxasync._src.algorithms.asgrad import delay_adaptive_asgd as delay_adaptive_asgd
from jaxasync._src.algorithms.asgrad import ps_asgd as ps_asgd
from jaxasync._src.algorithms.cluster import ClusterAgreementState as ClusterAgreementState
from jaxasync._src.algorithms.cluster import ClusterSGDState as ClusterSGDState
from jaxasync._src.algorithms.cluster import cluster_sgd as cluster_sgd
from jaxasync._src.algorithms.dasgd import DasgdState as DasgdState
from jaxasync._src.algorithms.dasgd import dasgd as dasgd
from jaxasync._src.algorithms.gossip import ADPSGDState as ADPSGDState
from jaxasync._src.algorithms.gossip import AllReduceSGDState as AllReduceSGDState
from jaxasync._src.algorithms.gossip import DPSGDState as DPSGDState
from jaxasync._src.algorithms.gossip import SGPState as SGPState
from jaxasync._src.algorithms.gossip import adpsgd as adpsgd
from jaxasync._src.algorithms.gossip import allreduce_sgd as allreduce_sgd
from jaxasync._src.algorithms.gossip import dpsgd as dpsgd
from jaxasync._src.algorithms.gossip import sgp as sgp
from jaxasync._src.algorithms.gossip import sgp_total_weight as sgp_total_weight
from jaxasync._src.algorithms.rfast import RFastState as RFastState
from jaxasync._src.algorithms.rfast import rfast as rfast
from jaxasync._src.algorithms.rfast import rfast_conservation_error as rfast_conservation_error
from jaxasync._src.algorithms.sequential import SgdState as SgdState
from jaxasync._src.algorithms.sequential import sgd as sgd
from jaxasync._src.algorithms.shared_memory import HogwildState as HogwildState
from jaxasync._src.algorithms.shared_memory import SparsifiedSGDState as SparsifiedSGDState
from jaxasync._src.algorithms.shared_memory import hogwild as hogwild
from jaxasync._src.algorithms.shared_memory import sparsified_sgd as sparsified_sgd

__all__ = (
    "adpsgd",
    "ADPSGDState",
    "allreduce_sgd",
    "AllReduceSGDState",
    "asgrad",
    "AsGradState",
    "cluster_sgd",
    "ClusterAgreementState",
    "ClusterSGDState",
    "dasgd",
    "DasgdState",
    "delay_adaptive_asgd",
    "dpsgd",
    "DPSGDState",
    "hogwild",
    "HogwildState",
    "ps_asgd",
    "rfast",
    "rfast_conservation_error",
    "RFastState",
    "sgd",
    "SgdState",
    "sgp",
    "sgp_total_weight",
    "SGPState",
    "sparsified_sgd",
    "SparsifiedSGDState",
)
