"""Hyperparameter search with Optuna: the study, one trial, the search space and the report."""

from classifier.core.moved import old_attribute


def __getattr__(name: str) -> object:
    """Names of 0.1's flat module `classifier.tune`, now in `classifier.tune.study`, for configs."""
    return old_attribute(__name__, name)
