# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Ready-made problems and data: least squares with a known optimum, AsGrad's logistic regression on
w7a or FedProx synthetic data, softmax regression and MLP classifiers, data generators and node splits."""

from jaxasync._src.datasets import binarize as binarize
from jaxasync._src.datasets import gaussian_mixture as gaussian_mixture
from jaxasync._src.datasets import load_libsvm as load_libsvm
from jaxasync._src.datasets import load_w7a as load_w7a
from jaxasync._src.datasets import split_contiguous as split_contiguous
from jaxasync._src.datasets import split_dirichlet as split_dirichlet
from jaxasync._src.datasets import split_iid as split_iid
from jaxasync._src.datasets import split_label_sorted as split_label_sorted
from jaxasync._src.datasets import synthetic_fedprox as synthetic_fedprox
from jaxasync._src.problems import accuracy as accuracy
from jaxasync._src.problems import asgrad_logistic as asgrad_logistic
from jaxasync._src.problems import cross_entropy_loss as cross_entropy_loss
from jaxasync._src.problems import least_squares as least_squares
from jaxasync._src.problems import least_squares_loss as least_squares_loss
from jaxasync._src.problems import least_squares_optimum as least_squares_optimum
from jaxasync._src.problems import logistic_loss as logistic_loss
from jaxasync._src.problems import logistic_regression as logistic_regression
from jaxasync._src.problems import mlp_apply as mlp_apply
from jaxasync._src.problems import mlp_classifier as mlp_classifier
from jaxasync._src.problems import mlp_init as mlp_init
from jaxasync._src.problems import nonconvex_regularizer as nonconvex_regularizer
from jaxasync._src.problems import softmax_regression as softmax_regression

__all__ = (
    "accuracy",
    "asgrad_logistic",
    "binarize",
    "cross_entropy_loss",
    "gaussian_mixture",
    "least_squares",
    "least_squares_loss",
    "least_squares_optimum",
    "load_libsvm",
    "load_w7a",
    "logistic_loss",
    "logistic_regression",
    "mlp_apply",
    "mlp_classifier",
    "mlp_init",
    "nonconvex_regularizer",
    "softmax_regression",
    "split_contiguous",
    "split_dirichlet",
    "split_iid",
    "split_label_sorted",
    "synthetic_fedprox",
)
