"""What a run says about a model: predictions, reports, calibration, class activation maps and embeddings."""

from classifier.core.moved import old_attribute


def __getattr__(name: str) -> object:
    """Names of 0.1's flat module `classifier.evaluation`, now `classifier.evaluation.predictions`, for configs."""
    return old_attribute(__name__, name)
