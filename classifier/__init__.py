"""Train, evaluate and ship image classifiers on folders of images, with Lightning and timm."""

from classifier.cli import cli_main
from classifier.data import ImageFolderDataModule
from classifier.module import ImageClassifier

__all__ = ["ImageClassifier", "ImageFolderDataModule", "cli_main"]
