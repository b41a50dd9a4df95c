"""Stratified hold-outs and folds for one label per image (scikit-learn) and for label sets (iterative
stratification, Sechidis et al. 2011, from the iterative-stratification package), optionally whole groups at a time.

`labels` is a vector of class indices, or a 0/1 matrix with one column per class (multi-label): in the second case a
rare label lands in every split in proportion, which stratifying on whole label sets cannot do.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split


def stratified_holdout(labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) positions: `size` of them held out, stratified (without groups)."""
    positions = np.arange(len(labels))
    if labels.ndim == 1:
        kept, held = train_test_split(positions, test_size=size, stratify=labels, random_state=seed)
        return kept, held
    split = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=size, random_state=seed)
    return next(split.split(np.zeros(len(labels)), labels))


def stratified_folds(
    labels: np.ndarray, num_folds: int, seed: int, groups: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """The validation positions of each of `num_folds` stratified folds; whole groups at a time with `groups`."""
    if groups is not None:
        names, unit = np.unique(groups, return_inverse=True)
        if labels.ndim == 2:  # a group carries every label of its images; its images follow it
            per_group = np.zeros((len(names), labels.shape[1]), dtype=labels.dtype)
            np.maximum.at(per_group, unit, labels)
            for held in stratified_folds(per_group, num_folds, seed):
                yield np.flatnonzero(np.isin(unit, held))
            return
        kfold = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
        for _, held in kfold.split(np.zeros(len(labels)), labels, groups):
            yield held
        return
    kind = StratifiedKFold if labels.ndim == 1 else MultilabelStratifiedKFold
    for _, held in kind(n_splits=num_folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels):
        yield held
