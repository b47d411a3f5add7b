# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Step-size schedules: constant, inverse time, delay-adaptive."""

from jaxasync._src.schedules import constant as constant
from jaxasync._src.schedules import delay_adaptive as delay_adaptive
from jaxasync._src.schedules import inverse_time as inverse_time

__all__ = (
    "constant",
    "delay_adaptive",
    "inverse_time",
)
