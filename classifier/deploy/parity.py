"""Proof that an exported model computes what its checkpoint does: the same preprocessed pixels through both, at
several batch sizes, on the checkpoint's frozen test split or on a folder of images. Both must give the same
probabilities and the same decisions: the top class, or for a multi-label model the set of labels at or over the
checkpoint's thresholds; and, for an ONNX graph of a checkpoint with a rejection, the same OOD scores (its second
output), which the rejection compares."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from classifier.core.imageio import list_images
from classifier.data.datamodule import ImageFolderDataModule
from classifier.data.shard_meta import split_files
from classifier.deploy.inputs import Scored, decide
from classifier.deploy.onnx_predictor import OnnxPredictor, probabilities_from_logits
from classifier.deploy.predictor import Predictor

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 7)
MAX_ABS_DIFF = 1e-4  # fp32's tolerance on each probability
MAX_SCORE_DIFF = 1e-4  # ... and on each OOD score, relative to the largest score's size when that is over 1
RANDOM_IMAGES = 32  # images of random pixels, where no real ones are at hand
CHECK_IMAGES = 2000  # at most, a stratified sample: 50,000 test images at 224 px would hold 7.5 GB
CALIBRATION_IMAGES = 200
REFERENCE_BATCH = 64
# what parity.json calls the share of images decided alike, and the share decided right, per task
AGREEMENT = {"multiclass": "top1_agreement", "multilabel": "label_set_agreement"}
ACCURACY = {"multiclass": "accuracy", "multilabel": "subset_accuracy"}
DECISION = {"multiclass": "top-1", "multilabel": "label set"}  # what a changed decision is, in messages


@dataclass
class CheckImages:
    """Images to compare on, preprocessed once by the PyTorch `Predictor`, with its probabilities and OOD scores for
    them, and how that checkpoint decides (`thresholds`: a multi-label checkpoint's; None: the top class)."""

    source: str
    pixels: np.ndarray  # uint8 NCHW
    reference: np.ndarray  # the checkpoint's probabilities
    labels: np.ndarray | None  # class indices (multi-label: 0/1 rows), when known
    paths: list[Path] | None  # None for random pixels
    thresholds: np.ndarray | None = None
    scores: np.ndarray | None = None  # the checkpoint's OOD scores

    @property
    def task(self) -> str:
        return "multiclass" if self.thresholds is None else "multilabel"


def records_split(checkpoint: dict) -> bool:
    return bool((checkpoint.get(ImageFolderDataModule.__qualname__) or {}).get("splits"))


@dataclass
class FrozenSplit:
    """Split `name` of a checkpoint's run: its files and labels, and the shards its images are read from when the
    run streamed them (`--data.shards`), so that parity needs no copy of the files."""

    name: str
    paths: list[Path]
    labels: list
    shards: ImageFolderDataModule | None = None

    def pixels(self, predictor: Predictor, chosen: list[Path]) -> np.ndarray:
        """uint8 NCHW pixels of `chosen`, through the checkpoint's eval transform, as `classifier test` sees them."""
        if self.shards is None:
            return np.stack([predictor.preprocess(path).numpy() for path in chosen])
        from classifier.data.shards import read_rows  # optional: LitData, the [shards] extra

        row = {path: index for index, path in enumerate(self.paths)}
        shards, rows = self.shards, [row[path] for path in chosen]
        options = (shards.hparams.shard_cache, shards.shard_storage_options)
        return torch.stack(read_rows(shards.shard_meta, self.name, rows, predictor.transform, *options)).numpy()


def frozen_split(checkpoint: dict, ckpt_path: Path, name: str, data_dir: str | None) -> FrozenSplit:
    """Split `name` recorded in the checkpoint, as `classifier test` finds it: its files checked unchanged, or the
    shards it was streamed from."""
    if not records_split(checkpoint):
        raise LookupError(f"{ckpt_path} records no frozen split")
    datamodule = ImageFolderDataModule.from_checkpoint(ckpt_path, data_dir, num_workers=0)
    if datamodule.hparams.shards:
        return FrozenSplit(name, *split_files(datamodule.splits, datamodule.shard_meta, name), datamodule)
    datamodule.splits.verify(name, datamodule.split_source)
    return FrozenSplit(name, *datamodule.splits.subset(name))


def pytorch_images(
    predictor: Predictor, source: str, paths: list[Path], labels: list[int] | None, pixels: np.ndarray | None = None
) -> CheckImages:
    """Images preprocessed (from `paths`, unless their `pixels` are given) and classified by the checkpoint's own
    `Predictor`."""
    if pixels is None:
        pixels = np.stack([predictor.preprocess(path).numpy() for path in paths])
    known = None if labels is None else np.array(labels)
    probabilities, scores = reference(predictor, pixels)
    return CheckImages(source, pixels, probabilities, known, paths, predictor.thresholds, scores)


def reference(predictor: Predictor, pixels: np.ndarray) -> Scored:
    """The checkpoint's probabilities for uint8 NCHW pixels, and its OOD scores when it rejects (None otherwise)."""
    chunks = [
        torch.from_numpy(pixels[start : start + REFERENCE_BATCH]) for start in range(0, len(pixels), REFERENCE_BATCH)
    ]
    if predictor.rejection is None:
        return torch.cat([predictor.predict_batch(chunk) for chunk in chunks]).numpy(), None
    probabilities, scores = zip(*(predictor.scored_batch(chunk) for chunk in chunks), strict=True)
    return torch.cat(probabilities).numpy(), torch.cat(scores).numpy()


def random_images(predictor: Predictor) -> CheckImages:
    """Seeded random pixels: a check of the graph, not of the preprocessing, for when no images are at hand."""
    pixels = np.random.default_rng(0).integers(0, 256, (RANDOM_IMAGES, *predictor.preprocessing["input_size"]))
    pixels = pixels.astype(np.uint8)
    probabilities, scores = reference(predictor, pixels)
    source = f"{RANDOM_IMAGES} random images"
    return CheckImages(source, pixels, probabilities, None, None, predictor.thresholds, scores)


def sample(paths: list[Path], labels: list | None, limit: int) -> tuple[list[Path], list | None]:
    """At most `limit` of the images, spread evenly over each class (multi-label: each set of labels; over the whole
    list without labels), so that a sample keeps their shares; all of them when they are fewer."""
    if len(paths) <= limit:
        return paths, labels
    groups = {0: list(range(len(paths)))} if labels is None else {}
    for index, label in enumerate(labels or []):
        groups.setdefault(tuple(label) if isinstance(label, list) else label, []).append(index)
    chosen = []
    for members in groups.values():
        count = max(1, round(limit * len(members) / len(paths)))
        chosen += [members[i] for i in np.linspace(0, len(members) - 1, min(count, len(members))).round().astype(int)]
    chosen = sorted(set(chosen))
    return [paths[i] for i in chosen], None if labels is None else [labels[i] for i in chosen]


def check_images(
    check: str, predictor: Predictor, checkpoint: dict, ckpt_path: Path, data_dir: str | None, limit: int = CHECK_IMAGES
) -> CheckImages:
    """`--check auto`: the frozen test split (random pixels, with a warning, only when the checkpoint records no
    split); `--check random`: random pixels; `--check DIR`: the images in DIR, labelled when they sit in folders
    named after the classes. At most `limit` images, a stratified sample."""
    if check == "random" or (check == "auto" and not records_split(checkpoint)):
        if check == "auto":
            log.warning("--check auto: %s records no frozen split; checking parity on %d random images instead "
                        "(--check DIR checks real images)", ckpt_path, RANDOM_IMAGES)  # fmt: skip
        return random_images(predictor)
    if check == "auto":
        try:
            split = frozen_split(checkpoint, ckpt_path, "test", data_dir)
        except (LookupError, OSError, ValueError) as error:
            raise type(error)(
                f"--check auto: the test split of {ckpt_path} cannot be checked: {error}\nPass --data_dir where its "
                "images are now, --check DIR for other images, or --check random"
            ) from error
        chosen, labels = sample(split.paths, split.labels, limit)
        source = f"test split of {ckpt_path} ({counted(chosen, split.paths)})"
        return pytorch_images(predictor, source, chosen, labels, split.pixels(predictor, chosen))
    folder = Path(check)
    if not folder.is_dir():
        raise FileNotFoundError(f"--check {check} is not a folder of images (nor auto, random or none)")
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"--check {folder} holds no images")
    index = {name: i for i, name in enumerate(predictor.class_names)}
    classes = [path.relative_to(folder).parts[0] if len(path.relative_to(folder).parts) > 1 else "" for path in paths]
    labels = [index[name] for name in classes] if all(name in index for name in classes) else None
    if predictor.thresholds is not None:  # a folder names one label, not an image's whole set of them
        labels = None
    chosen, labels = sample(paths, labels, limit)
    return pytorch_images(predictor, f"{folder} ({counted(chosen, paths)})", chosen, labels)


def counted(chosen: list[Path], paths: list[Path]) -> str:
    return (
        f"{len(chosen)} images" if len(chosen) == len(paths) else f"a stratified {len(chosen)} of {len(paths)} images"
    )


@dataclass
class Calibration:
    source: str
    batches: list[np.ndarray]  # one uint8 image per batch, which a fixed-batch model takes too
    scored: bool = False  # calibrated on the images its accuracy is then measured on: an optimistic figure


def calibration_images(
    checkpoint: dict, ckpt_path: Path, data_dir: str | None, images: CheckImages | None, predictor: Predictor
) -> Calibration:
    """Up to 200 images of the checkpoint's train split, spread over it; the --check folder's when it has none."""
    try:
        split = frozen_split(checkpoint, ckpt_path, "train", data_dir)
        paths, source = split.paths, "train split"
    except (LookupError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0]
        if images is None or images.paths is None:
            raise ValueError(
                f"--quantize int8 calibrates on the checkpoint's train split, and {reason}: pass --data_dir where its "
                "images are now, or --check DIR to calibrate on the images of DIR"
            ) from error
        log.warning("--quantize int8: %s; calibrating on the --check images, which also score it: its accuracy "
                    "there is optimistic (parity.json flags it)", reason)  # fmt: skip
        paths, source, split = images.paths, "--check", FrozenSplit("check", images.paths, [])
    chosen = sorted(set(np.linspace(0, len(paths) - 1, min(CALIBRATION_IMAGES, len(paths))).round().astype(int)))
    batches = [image[None] for image in split.pixels(predictor, [paths[i] for i in chosen])]
    return Calibration(f"{len(batches)} {source} images", batches, scored=source == "--check")


def runner(path: Path, description: dict) -> Callable[[np.ndarray], np.ndarray]:
    """The exported file as a function from uint8 NCHW pixels to probabilities."""
    if description["format"] == "onnx":
        return OnnxPredictor(path).predict_batch
    if description["format"] == "exported_program":
        module = torch.export.load(path).module()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation, which export already logged
            module = torch.jit.load(str(path))
    step = None if description["dynamic_batch"] else 1

    def run(pixels: np.ndarray) -> np.ndarray:
        size = step or len(pixels)
        with torch.inference_mode():
            chunks = [module(torch.from_numpy(pixels[i : i + size])) for i in range(0, len(pixels), size)]
        output = torch.cat(chunks).numpy()
        logits = description["output"] == "logits"
        return probabilities_from_logits(output, description.get("task")) if logits else output

    return run


def agreement(decisions: np.ndarray, others: np.ndarray) -> float:
    """The share of images decided alike: the same class, or the same set of labels."""
    same = decisions == others
    return float((same.all(axis=1) if same.ndim == 2 else same).mean())


def compare(reference: np.ndarray, probs: np.ndarray, labels: np.ndarray | None, thresholds: np.ndarray | None) -> dict:
    """Largest probability difference, the share of images decided as the checkpoint does (the top class, or the
    set of labels at or over `thresholds`), and the share decided right when the labels are known."""
    decisions, task = decide(probs, thresholds), "multiclass" if thresholds is None else "multilabel"
    return {
        "max_abs_diff": float(np.abs(probs - reference).max()),
        AGREEMENT[task]: agreement(decisions, decide(reference, thresholds)),
        ACCURACY[task]: None if labels is None else agreement(decisions, labels),
    }


def score_difference(path: Path, description: dict, images: CheckImages) -> float | None:
    """The largest difference between the ONNX graph's `ood_score` output and the checkpoint's scores, relative to
    their size when over 1 (at one batch size: the probabilities check the batching); None where there are none to
    compare: only ONNX graphs output scores, and only those of a checkpoint with a rejection."""
    if description["format"] != "onnx" or images.scores is None:
        return None
    onnx = OnnxPredictor(path)
    scores = in_batches(lambda chunk: onnx.scored_batch(chunk)[1], images.pixels, max(BATCH_SIZES))
    return float(np.abs(scores - images.scores).max() / max(1.0, float(np.abs(images.scores).max())))


def in_batches(run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([run(pixels[start : start + size]) for start in range(0, len(pixels), size)])


def pytorch_accuracy(images: CheckImages) -> float | None:
    """The checkpoint's own accuracy (multi-label: subset accuracy) on the images, when their labels are known."""
    return None if images.labels is None else agreement(decide(images.reference, images.thresholds), images.labels)


def describe_images(images: CheckImages) -> dict:
    report = {"images": images.source, "count": len(images.pixels)}
    report[f"pytorch_{ACCURACY[images.task]}"] = pytorch_accuracy(images)
    if images.thresholds is not None:
        report |= {"task": images.task, "thresholds": images.thresholds.tolist()}
    return report


def check_parity(
    predictor: Predictor, path: Path, description: dict, images: CheckImages, batch_sizes=BATCH_SIZES
) -> dict:
    """parity.json's fp32 part; its `failure` says by how much it missed MAX_ABS_DIFF and 100% agreement (top-1, or
    multi-label the same label sets), and for ONNX, whose graph outputs the OOD scores, MAX_SCORE_DIFF."""
    run = runner(path, description)
    by_size = {str(size): compare(images.reference, in_batches(run, images.pixels, size), images.labels,
                                  images.thresholds) for size in batch_sizes}  # fmt: skip
    worst = max(result["max_abs_diff"] for result in by_size.values())
    agreed = AGREEMENT[images.task]
    least = min(result[agreed] for result in by_size.values())
    report = {**describe_images(images), "tolerance": {"max_abs_diff": MAX_ABS_DIFF, agreed: 1.0}}
    report["batch_sizes"] = by_size
    score_diff = score_difference(path, description, images)
    if score_diff is not None:
        report["tolerance"]["max_score_diff"] = MAX_SCORE_DIFF
        report["max_score_diff"] = score_diff
    problems = []
    if description["format"] == "onnx" and images.paths is not None:  # the torch-free preprocessing, on the same files
        onnx = OnnxPredictor(path)
        differ = [
            p for p, pixels in zip(images.paths, images.pixels, strict=True) if (onnx.preprocess(p) != pixels).any()
        ]
        report["preprocessing_mismatches"] = len(differ)
        if differ:
            problems.append(
                f"classifier.deploy.onnx_predictor preprocesses {len(differ)} images differently, such as {differ[0]}"
            )
    if worst > MAX_ABS_DIFF:
        problems.append(f"probabilities differ by up to {worst:.3g} (tolerance {MAX_ABS_DIFF:g})")
    if score_diff is not None and score_diff > MAX_SCORE_DIFF:
        problems.append(f"OOD scores differ by up to {score_diff:.3g} (tolerance {MAX_SCORE_DIFF:g}, relative)")
    if least < 1.0:
        problems.append(f"{DECISION[images.task]} agrees on {least:.2%} of images, not 100%")
    report["passed"] = not problems
    if problems:
        report["failure"] = "; ".join(problems)
    log.info(
        "Parity on %s: max |Δp| %.3g, %s %.2f%%%s over batch sizes %s",
        images.source,
        worst,
        f"{DECISION[images.task]} agreement",
        100 * least,
        "" if score_diff is None else f", max |Δscore| {score_diff:.3g}",
        ", ".join(by_size),
    )
    return report


def check_quantized(
    path: Path, images: CheckImages, calibration: Calibration, max_accuracy_drop: float, batch_size: int = 7
) -> dict:
    """parity.json's int8 part: agreement with the checkpoint and the accuracy change (multi-label: subset
    accuracy), in points; without labels, the share of images whose decision changed bounds the drop."""
    result = compare(images.reference, in_batches(OnnxPredictor(path).predict_batch, images.pixels, batch_size),
                     images.labels, images.thresholds)  # fmt: skip
    agreed, accuracy = AGREEMENT[images.task], ACCURACY[images.task]
    change = None
    if images.labels is not None:
        change = 100 * (result[accuracy] - pytorch_accuracy(images))
    drop = -change if change is not None else 100 * (1 - result[agreed])
    report = {"model": path.name, "calibration": calibration.source, **result, "accuracy_change_points": change}
    report["calibrated_on_scored_images"] = calibration.scored
    report |= {"max_accuracy_drop_points": max_accuracy_drop, "passed": drop <= max_accuracy_drop}
    if drop > max_accuracy_drop:
        if images.labels is not None:
            measured = f"{accuracy.replace('_', ' ')} drops"
        else:
            measured = f"{DECISION[images.task]} changes on"
        report["failure"] = f"int8 {measured} {drop:.2f} points (--max_accuracy_drop {max_accuracy_drop:g})"
    log.info("int8 on %s: %s agreement %.2f%%, %s change %s points", images.source, DECISION[images.task],
             100 * result[agreed], accuracy.replace("_", " "),
             "n/a" if change is None else f"{change:+.2f}")  # fmt: skip
    return report
