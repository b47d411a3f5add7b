# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Job-assignment policies of server-based asynchronous SGD (pure, random, shuffled)."""

from jaxasync._src.assignment import AssignmentPolicy as AssignmentPolicy
from jaxasync._src.assignment import AssignmentState as AssignmentState
from jaxasync._src.assignment import assignment_policy as assignment_policy
from jaxasync._src.assignment import draw_assignments as draw_assignments
from jaxasync._src.assignment import pure_assignment as pure_assignment
from jaxasync._src.assignment import random_assignment as random_assignment
from jaxasync._src.assignment import shuffle_once_assignment as shuffle_once_assignment
from jaxasync._src.assignment import shuffled_assignment as shuffled_assignment

__all__ = (
    "assignment_policy",
    "AssignmentPolicy",
    "AssignmentState",
    "draw_assignments",
    "pure_assignment",
    "random_assignment",
    "shuffle_once_assignment",
    "shuffled_assignment",
)
