"""Images on disk to batches: the datamodule, its datasets, frozen splits, samplers, the RAM cache, device-side
augmentation and file facts."""

from classifier.core.moved import old_attribute


def __getattr__(name: str) -> object:
    """Names of 0.1's flat module `classifier.data`, now in `classifier.data.datamodule`, for configs."""
    return old_attribute(__name__, name)
