"""Likely label errors from out-of-fold probabilities: confident learning (Northcutt et al., JAIR 2021), in-house.

Torch-free (numpy, csv, Pillow, matplotlib), so `check-data` can rank a cv run's images without loading a model.
Each image labelled i is assigned to the class j the model is confident of: the most probable class among those whose
probability reaches the class's threshold, the mean probability of that class over the images labelled with it; an
image confident of no class goes to the model's prediction. The images assigned to a class other than their label
(the off-diagonal of the confident joint) are the suspects, unless the model's own prediction is their label. They
rank by self-confidence, the probability of the given label, lowest first. This is cleanlab's
`filter_by="confident_learning"` joined with its `predicted_neq_given` for the rows confident of no class; its
default, pruning by noise rate, takes as many images per cell but picks them by margin after rescaling the joint to
the class sizes, which a ranked list does not need.

Multi-label, each label is a yes/no question of its own (one-vs-rest, as cleanlab's multi-label filter does): the
same rule on the two classes absent (1 - p) and present (p) finds the images whose given 0 or 1 the sigmoid
probability contradicts, a missing or a wrong label; every (image, label) suspect ranks together, by the
self-confidence of its given 0/1, lowest first.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: files only, and the user's backend stays as it is

from classifier.core.atomic import atomic_open
from classifier.core.figures import image_gallery_figure, save_figure

THRESHOLD_SLACK = 1e-6  # cleanlab's: a class whose images all score the same p stays above its mean's rounding
COLUMNS = ("rank", "path", "given", "predicted", "self_confidence", "predicted_confidence")
SET_COLUMNS = ("rank", "path", "label", "given", "problem", "probability")  # multi-label: one row per image and label
LABEL_SEPARATOR = ";"  # classifier.data.splits' (which imports scikit-learn, for its stratification)


@dataclass(frozen=True)
class LabelIssue:
    """One image whose label the out-of-fold probabilities contradict; rank 1 is the most suspect."""

    path: Path
    given: str
    predicted: str  # the class confident learning assigns it
    self_confidence: float  # p(given)
    predicted_confidence: float  # p(predicted)
    rank: int


@dataclass(frozen=True)
class LabelSetIssue:
    """Multi-label: one label of one image whose given 0/1 its out-of-fold probability contradicts; rank 1 is the
    most suspect."""

    path: Path
    label: str
    given: int  # 1: the image is labelled with it; 0: it is not
    probability: float  # the out-of-fold p(label)
    rank: int

    @property
    def problem(self) -> str:
        """missing (not given, yet the model sees it) or wrong (given, yet the model does not see it)."""
        return "wrong" if self.given else "missing"


def find_label_issues(oof_csv: Path) -> list[LabelIssue]:
    """The likely label errors of a `classifier cv` run's oof_predictions.csv, most suspect first."""
    paths, given, probs, classes = read_probabilities(oof_csv)
    assigned, suspect, self_confidence = confident_learning(given, probs)
    order = [i for i in np.argsort(self_confidence, kind="stable") if suspect[i]]
    return [
        LabelIssue(paths[i], classes[given[i]], classes[assigned[i]], float(self_confidence[i]),
                   float(probs[i, assigned[i]]), rank)
        for rank, i in enumerate(order, start=1)
    ]  # fmt: skip


def find_label_set_issues(oof_csv: Path) -> list[LabelSetIssue]:
    """Multi-label: the likely missing and wrong labels of a cv run's oof_predictions.csv, most suspect first (ties
    in file order, then class order)."""
    paths, given, probs, classes = read_probabilities(oof_csv, multilabel=True)
    found = []
    for k in range(len(classes)):
        present = probs[:, k]
        _, suspect, self_confidence = confident_learning(given[:, k], np.stack([1 - present, present], axis=1))
        found += [(float(self_confidence[i]), i, k) for i in np.flatnonzero(suspect)]
    return [
        LabelSetIssue(paths[i], classes[k], int(given[i, k]), float(probs[i, k]), rank)
        for rank, (_, i, k) in enumerate(sorted(found), start=1)
    ]


def confident_learning(given: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's assigned class, whether it is a suspect, and its self-confidence, given its class indices and
    probabilities (rows x classes)."""
    labelled = np.eye(probs.shape[1], dtype=bool)[given]  # rows x classes: which label each row has
    counts = labelled.sum(axis=0)
    thresholds = np.divide((probs * labelled).sum(axis=0), counts, out=np.full(len(counts), np.inf), where=counts > 0)
    confident = probs >= thresholds - THRESHOLD_SLACK
    predicted = probs.argmax(axis=1)
    # a row confident of no class goes to the model's prediction: left out, a flipped image whose true class falls
    # just under its threshold would never be listed (cleanlab's `predicted_neq_given` for those rows)
    assigned = np.where(confident.any(axis=1), np.where(confident, probs, -1.0).argmax(axis=1), predicted)
    self_confidence = probs[np.arange(len(given)), given]
    return assigned, (assigned != given) & (predicted != given), self_confidence


def read_probabilities(oof_csv: Path, multilabel: bool = False) -> tuple[list[Path], np.ndarray, np.ndarray, list[str]]:
    """Paths, given labels (class indices; multi-label, a 0/1 row per image from its LABEL_SEPARATOR-joined target),
    probabilities (rows x classes) and class names of a predictions CSV."""
    if not oof_csv.is_file():
        raise FileNotFoundError(f"{oof_csv} does not exist: run `classifier cv` and pass its oof_predictions.csv")
    with open(oof_csv, newline="") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        classes = [column.removeprefix("prob_") for column in columns if column.startswith("prob_")]
        if not classes or "target" not in columns or "path" not in columns:
            raise ValueError(
                f"{oof_csv} needs path, target and prob_<class> columns, as `classifier cv` writes in "
                f"oof_predictions.csv; it has {', '.join(columns) or 'none'}"
            )
        index = {name: i for i, name in enumerate(classes)}
        paths, given, probs = [], [], []
        for row in reader:
            names = [name for name in row["target"].split(LABEL_SEPARATOR) if name] if multilabel else [row["target"]]
            unknown = [name for name in names if name not in index]
            if unknown:
                raise ValueError(
                    f"{oof_csv} line {reader.line_num}: target {unknown[0]!r} is not one of its prob_ classes "
                    f"({', '.join(classes)})"
                )
            paths.append(Path(row["path"]))
            given.append(np.isin(classes, names).astype(np.int64) if multilabel else index[names[0]])
            probs.append([number(row[f"prob_{name}"], oof_csv, reader.line_num, name) for name in classes])
    if not paths:
        raise ValueError(f"{oof_csv} has no rows: were its folds' validation splits empty?")
    return paths, np.array(given), np.array(probs), classes


def number(text: str | None, oof_csv: Path, line: int, name: str) -> float:
    """A probability from the CSV, or an error naming the file, line and column."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{oof_csv} line {line}: prob_{name} is {text!r}, not a number")
    return value


def write_label_issues(
    issues: list[LabelIssue] | list[LabelSetIssue], out_dir: Path, shown: int = 16, multilabel: bool = False
) -> None:
    """label_issues.csv with every suspect (multi-label: one row per image and label), and label_issues.png with the
    top `shown` (none when there are none)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / "label_issues.csv", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(SET_COLUMNS if multilabel else COLUMNS)
        for issue in issues:
            if isinstance(issue, LabelSetIssue):
                writer.writerow([issue.rank, str(issue.path), issue.label, issue.given, issue.problem,
                                 f"{issue.probability:.7g}"])  # fmt: skip
            else:
                writer.writerow([issue.rank, str(issue.path), issue.given, issue.predicted,
                                 f"{issue.self_confidence:.7g}", f"{issue.predicted_confidence:.7g}"])  # fmt: skip
    if issues and shown > 0:
        save_figure(gallery_figure(issues[:shown]), out_dir / "label_issues.png")


def gallery_figure(issues: list[LabelIssue] | list[LabelSetIssue]) -> Figure:
    """Each suspect's image titled with its given and predicted label (multi-label: the label, whether it is given,
    and its probability); a grey tile for a file that no longer decodes."""
    captions = [
        f"#{issue.rank} {issue.label} {'given' if issue.given else 'not given'}\n"
        f"(p({issue.label}) {issue.probability:.2f}: {issue.problem}?)"
        if isinstance(issue, LabelSetIssue)
        else f"#{issue.rank} given {issue.given} / predicted {issue.predicted}\n(conf {issue.predicted_confidence:.2f})"
        for issue in issues
    ]
    title = "likely label errors (lowest confidence in the given label first)"
    return image_gallery_figure([issue.path for issue in issues], captions, title)
