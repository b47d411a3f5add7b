# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Gossip, push-sum, pairwise averaging and the robust running-sum channel."""

from jaxasync._src.mixing import PushSumState as PushSumState
from jaxasync._src.mixing import RunningSumState as RunningSumState
from jaxasync._src.mixing import keep_newest as keep_newest
from jaxasync._src.mixing import pairwise_average as pairwise_average
from jaxasync._src.mixing import pull_mix as pull_mix
from jaxasync._src.mixing import pull_mix_node as pull_mix_node
from jaxasync._src.mixing import push_sum_estimate as push_sum_estimate
from jaxasync._src.mixing import push_sum_init as push_sum_init
from jaxasync._src.mixing import push_sum_mass as push_sum_mass
from jaxasync._src.mixing import push_sum_mix as push_sum_mix
from jaxasync._src.mixing import push_sum_receive as push_sum_receive
from jaxasync._src.mixing import push_sum_split as push_sum_split
from jaxasync._src.mixing import running_sum_absorb as running_sum_absorb
from jaxasync._src.mixing import running_sum_init as running_sum_init
from jaxasync._src.mixing import running_sum_receive as running_sum_receive
from jaxasync._src.mixing import running_sum_send as running_sum_send
from jaxasync._src.mixing import running_sum_unabsorbed as running_sum_unabsorbed

__all__ = (
    "keep_newest",
    "pairwise_average",
    "pull_mix",
    "pull_mix_node",
    "push_sum_estimate",
    "push_sum_init",
    "push_sum_mass",
    "push_sum_mix",
    "push_sum_receive",
    "push_sum_split",
    "PushSumState",
    "running_sum_absorb",
    "running_sum_init",
    "running_sum_receive",
    "running_sum_send",
    "running_sum_unabsorbed",
    "RunningSumState",
)
