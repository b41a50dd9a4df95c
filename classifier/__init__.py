"""Train, evaluate and ship image classifiers on folders of images, with Lightning and timm."""

from classifier.cli import cli_main
from classifier.data import ImageFolderDataModule
from classifier.module import ImageClassifier
from classifier.net import ClassifierNet
from classifier.predictor import Predictor

__all__ = ["ClassifierNet", "ImageClassifier", "ImageFolderDataModule", "Predictor", "cli_main"]
