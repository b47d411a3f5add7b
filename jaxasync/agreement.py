# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Approximate agreement: boxes, midpoints, quorum predicates and checkers."""

from jaxasync._src.agreement import average as average
from jaxasync._src.agreement import box as box
from jaxasync._src.agreement import box_midpoint as box_midpoint
from jaxasync._src.agreement import diameter_linf as diameter_linf
from jaxasync._src.agreement import has_quorum as has_quorum
from jaxasync._src.agreement import inside_box as inside_box
from jaxasync._src.agreement import rounds_needed as rounds_needed
from jaxasync._src.agreement import simulate_maa_round as simulate_maa_round

__all__ = (
    "average",
    "box",
    "box_midpoint",
    "diameter_linf",
    "has_quorum",
    "inside_box",
    "rounds_needed",
    "simulate_maa_round",
)
