"""`classifier explain`: where a checkpoint looks (class activation maps, worst mistakes first) and how it arranges
its images (penultimate features, mapped to 2-D and for TensorBoard's projector), on its frozen split or on a
folder of images. The checkpoint alone rebuilds the network (`Predictor`): no config is needed."""

from __future__ import annotations

import argparse
import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from classifier.cli.run_folders import new_timestamped_dir
from classifier.core.atomic import atomic_open
from classifier.core.figures import save_figure
from classifier.core.imageio import IMAGE_EXTENSIONS
from classifier.data.datamodule import ImageFolderDataModule
from classifier.data.file_facts import verify_files
from classifier.data.file_lists import listing, predict_paths
from classifier.data.splits import LABEL_SEPARATOR, SPLITS
from classifier.deploy.predictor import Predictor
from classifier.evaluation.embeddings import (
    PROJECTIONS,
    embedding_figure,
    penultimate,
    project,
    sprite_thumb_size,
    thumbnails,
    write_projector,
)
from classifier.model.checkpoints import read_checkpoint
from classifier.model.devices import device_of

log = logging.getLogger(__name__)

CAM_COLUMNS = ["path", "label", "prediction", "confidence", "target", "target_probability", "cam_mean", "cam_peak_x",
               "cam_peak_y", "overlay"]  # fmt: skip
LABEL_CAM_COLUMNS = ["path", "label", "prediction", "target", "target_probability", "threshold", "cam_mean",
                     "cam_peak_x", "cam_peak_y", "overlay"]  # fmt: skip  # multi-label: one row per map
TARGETS = ("pred", "true")


@dataclass
class Images:
    """The images to explain, in path order, with their class indices (multi-label: 0/1 rows) when known."""

    source: str  # how the titles and the log name them
    paths: list[Path]
    labels: np.ndarray | None


def explain(argv: list[str]) -> Path:
    """`classifier explain`: parse the options and explain; returns the output folder."""
    parser = argparse.ArgumentParser(
        prog="classifier explain",
        description="Explain a checkpoint on its frozen test split (or --split, or the images of "
        "--data.predict_dir): class activation maps (cams/, cam_grid.png with the worst mistakes first, cams.csv), "
        "or with --embeddings its penultimate features (embeddings.npy, embeddings.csv, embedding.png and "
        "TensorBoard projector files).",
    )
    parser.add_argument("--ckpt_path", type=Path, required=True, help="the checkpoint to explain (from fit)")
    parser.add_argument(
        "--data.predict_dir",
        dest="predict_dir",
        help="explain these images instead of a split: a folder (labelled when its subfolders are class names), an "
        "image, or a .txt list",
    )
    parser.add_argument("--split", choices=SPLITS, help="the checkpoint's frozen split to explain (default test)")
    parser.add_argument("--data.data_dir", dest="data_dir", help="where the split's images are now, if they moved")
    parser.add_argument(
        "--method",
        default="gradcam",
        choices=["gradcam", "gradcam++", "eigencam"],
        help="the map: Grad-CAM (default), Grad-CAM++, or EigenCAM (the same map whatever the class)",
    )
    parser.add_argument(
        "--target",
        default="pred",
        help="the class each map explains: pred (the prediction), true (the label) or a class name (default pred); "
        "multi-label, a map per predicted (true: given) label, or of the most probable label when there is none",
    )
    parser.add_argument(
        "--layer", default="auto", help="the module to explain (a name of net.named_modules()); auto: a CNN's last "
        "feature stage with maps of 2x2 or more at the input size, a ViT's last block's norm1"
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="output folder (default: explain/<timestamp> in the run's folder)")
    parser.add_argument(
        "--limit",
        type=int,
        help="at most N images: the N worst ranked for maps (mistakes first), N spread over the split for embeddings",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward (and backward) pass")
    parser.add_argument("--device", default="cpu", help="where to compute: cpu, cuda, cuda:1, mps...")
    parser.add_argument("--embeddings", action="store_true", help="penultimate features instead of maps")
    parser.add_argument("--projection", default="tsne", choices=["tsne", "pca"], help="--embeddings' 2-D map")
    parser.add_argument("--seed", type=int, default=0, help="the t-SNE's seed: the same seed, the same map")
    return explain_checkpoint(**vars(parser.parse_args(argv)))


def explain_checkpoint(
    ckpt_path: str | Path,
    predict_dir: str | None = None,
    split: str | None = None,
    data_dir: str | None = None,
    method: str = "gradcam",
    target: str = "pred",
    layer: str = "auto",
    out: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    embeddings: bool = False,
    projection: str = "tsne",
    seed: int = 0,
) -> Path:
    """Maps (or, with `embeddings`, features) of a checkpoint on its split or `predict_dir`; returns the folder.
    Every option is checked before the images are read."""
    from classifier.evaluation.cams import METHODS, target_layer  # grad-cam: the [explain] extra

    ckpt_path = Path(ckpt_path)
    for name, value, choices in (("--method", method, tuple(METHODS)), ("--projection", projection, PROJECTIONS)):
        if value not in choices:
            raise ValueError(f"{name} {value}: choose one of {', '.join(choices)}")
    for name, value in (("--limit", limit), ("--batch_size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} {value}: give a positive number")
    if predict_dir and split:
        raise ValueError("give --data.predict_dir or --split, not both")
    checkpoint = read_checkpoint(ckpt_path)
    predictor = Predictor.from_checkpoint(ckpt_path, device_of(device), tta="none", batch_size=batch_size)
    classes = predictor.class_names
    if not embeddings:
        layer = target_layer(predictor.net, layer)
        if target not in (*TARGETS, *classes):
            raise ValueError(
                f"--target {target}: give pred, true or one of the checkpoint's classes: {', '.join(classes)}"
            )
    images = (
        folder_images(Path(predict_dir), classes, predictor.net.multilabel)
        if predict_dir
        else split_images(ckpt_path, checkpoint, split or "test", data_dir)
    )
    if not embeddings and target == "true" and images.labels is None:
        raise ValueError(
            f"--target true needs labels, and {images.source} has none: put the images in subfolders named after "
            f"the classes ({', '.join(classes)}), or explain --target pred"
        )
    if embeddings and len(images.paths) < 2:
        raise ValueError(f"--embeddings maps at least 2 images, and {images.source} gives {len(images.paths)}")
    if embeddings and limit == 1:
        raise ValueError("--embeddings maps at least 2 images: --limit 1 leaves one")
    folder = output_folder(ckpt_path, out)
    if tta := (checkpoint.get("hyper_parameters") or {}).get("tta"):
        log.info("Explained without the checkpoint's test-time augmentation (%s): the network's own view", tta)
    if embeddings:
        write_embeddings(predictor, images, folder, limit, projection, seed)
    else:
        write_cams(predictor, images, folder, method, target, layer, limit)
    return folder


def folder_images(source: Path, classes: list[str], multilabel: bool = False) -> Images:
    """--data.predict_dir's images, labelled when each sits in a subfolder named after one of `classes` (multi-label:
    with that one label)."""
    paths = readable(predict_paths(source), f"--data.predict_dir {source}")
    labels = None
    if source.is_dir():
        index = {name: i for i, name in enumerate(classes)}
        parts = [path.relative_to(source).parts for path in paths]
        if all(len(part) > 1 and part[0] in index for part in parts):
            labels = np.array([index[part[0]] for part in parts])
            labels = np.eye(len(classes), dtype=np.int64)[labels] if multilabel else labels
    return Images(f"--data.predict_dir {source} ({len(paths)} images)", paths, labels)


def split_images(ckpt_path: Path, checkpoint: dict, split: str, data_dir: str | None) -> Images:
    """The checkpoint's frozen `split`, as `classifier test` finds it: its files checked unchanged since the fit."""
    if not (checkpoint.get(ImageFolderDataModule.__qualname__) or {}).get("splits"):
        raise ValueError(
            f"--ckpt_path {ckpt_path} records no frozen split (it predates split tables): explain images with "
            "--data.predict_dir DIR"
        )
    root = Path(data_dir or checkpoint["datamodule_hyper_parameters"]["data_dir"])
    if not root.is_dir():
        said = f"--data.data_dir {root}" if data_dir else f"the run's data_dir {root}"
        raise FileNotFoundError(f"{said} does not exist: pass --data.data_dir where the run's images are now")
    datamodule = ImageFolderDataModule.from_checkpoint(ckpt_path, data_dir, num_workers=0)
    datamodule.splits.verify(split, datamodule.split_source)
    paths, labels = datamodule.splits.subset(split)
    if not paths:
        raise ValueError(f"--split {split}: the run of {ckpt_path} held out no {split} images")
    kept = set(readable(paths, f"the {split} split"))
    rows = [i for i, path in enumerate(paths) if path in kept]
    return Images(f"the {split} split ({len(rows)} images)", [paths[i] for i in rows], np.array(labels)[rows])


def readable(paths: list[Path], source: str) -> list[Path]:
    """`paths` that decode; the others skipped with a warning that lists them; an error when none is left."""
    if not paths:
        raise ValueError(f"{source} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    bad = {path: facts.reason for path, facts in verify_files(paths).items() if facts.reason is not None}
    if len(bad) == len(paths):
        raise ValueError(f"none of the {len(paths)} images of {source} can be read:\n{listing(bad)}")
    if bad:
        log.warning("Skipping %d unreadable images of %s:\n%s", len(bad), source, listing(bad))
    return [path for path in paths if path not in bad]


def output_folder(ckpt_path: Path, out: str | Path | None) -> Path:
    """`--out`, created; by default `explain/<timestamp>` in the checkpoint's run folder (as predict's), or under
    lightning_logs/evaluations/<checkpoint name>/ for a checkpoint outside one."""
    if out is None:
        resolved = ckpt_path.resolve()
        in_run = resolved.parent.name == "checkpoints"
        run = resolved.parent.parent if in_run else Path("lightning_logs") / "evaluations" / ckpt_path.stem
        return new_timestamped_dir(run / "explain")
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"--out {folder} cannot be made: {error.strerror or error}") from error
    return folder


def batches(predictor: Predictor, paths: list[Path], size: int) -> Iterator[tuple[range, Tensor]]:
    """(rows, uint8 NCHW pixels as the network sees them) per batch: decoded when iterated, one batch at a time."""
    for start in range(0, len(paths), size):
        rows = range(start, min(start + size, len(paths)))
        yield rows, torch.stack([predictor.preprocess(paths[i]) for i in rows])


def normalised(predictor: Predictor, pixels: Tensor) -> Tensor:
    """uint8 pixels as the network takes them: on its device, normalised as it was trained."""
    return (pixels.to(predictor.device).float() - predictor.mean) / predictor.std


def worst_first(probs: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Image order for the maps: mistakes, then correct ones, each by loss (-log p(label)) from the highest;
    without labels, the least confident first."""
    if labels is None:
        return np.argsort(probs.max(axis=1), kind="stable")
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    correct = probs.argmax(axis=1) == labels
    return np.lexsort((-loss, correct))


def unique_names(paths: list[Path]) -> list[str]:
    """`<stem>.png` per path; a stem seen before gets `-2`, `-3`... so no overlay replaces another."""
    taken, names = set(), []
    for path in paths:
        name, count = f"{path.stem}.png", 1
        while name in taken:
            count += 1
            name = f"{path.stem}-{count}.png"
        taken.add(name)
        names.append(name)
    return names


@dataclass
class Reading:
    """What the checkpoint makes of each image: its probabilities and decision (the class, or under multi-label the
    labels at or over their thresholds), beside the given labels when known; and how each map of it is described."""

    classes: list[str]
    probs: np.ndarray
    labels: np.ndarray | None
    thresholds: np.ndarray | None  # multi-label only

    @cached_property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1) if self.thresholds is None else self.probs >= self.thresholds

    def said(self, i: int) -> tuple[str, str]:
        """Image `i`'s label ("" when unknown) and prediction, as text (multi-label: `;`-joined sets)."""
        if self.thresholds is None:
            label = "" if self.labels is None else self.classes[self.labels[i]]
            return label, self.classes[self.predicted[i]]
        label = "" if self.labels is None else label_set(self.labels[i], self.classes)
        return label, label_set(self.predicted[i], self.classes)

    def wrong(self, i: int) -> bool:
        """Whether image `i`'s prediction (multi-label: any label's decision) differs from its known label."""
        if self.labels is None:
            return False
        return bool((self.labels[i] != self.predicted[i]).any())

    def row(self, i: int, k: int, path: Path) -> list:
        """cams.csv's columns before the map's own, for the map of class `k` on image `i`."""
        probs, (label, said) = self.probs[i], self.said(i)
        if self.thresholds is None:
            best = self.predicted[i]
            return [str(path), label, said, f"{probs[best]:.7g}", self.classes[k], f"{probs[k]:.7g}"]
        return [str(path), label, said, self.classes[k], f"{probs[k]:.7g}", f"{self.thresholds[k]:.7g}"]

    def caption(self, i: int, k: int, path: Path) -> str:
        """The grid's title of the map: the label and its probability under multi-label."""
        classes, probs, best = self.classes, self.probs, self.predicted[i]
        if self.thresholds is not None:
            given = "" if self.labels is None else f"\ntrue {label_set(self.labels[i], classes) or 'none'}"
            return f"{path.name}\n{classes[k]} {probs[i, k]:.2f}{given}"
        caption = f"{path.name}\n" + ("" if self.labels is None else f"true {classes[self.labels[i]]} / ")
        return caption + f"pred {classes[best]} {probs[i, best]:.2f}" + (f"\nmap of {classes[k]}" if k != best else "")

    def mistake(self, i: int, k: int) -> bool:
        """A wrong prediction (multi-label: a wrong decision on the mapped label), captioned in red."""
        if self.labels is None or self.thresholds is None:
            return self.wrong(i)
        return bool(self.labels[i, k]) != bool(self.predicted[i, k])


def write_cams(
    predictor: Predictor,
    images: Images,
    folder: Path,
    method: str,
    target: str,
    layer: str,
    limit: int | None,
) -> None:
    """cams/<stem>.png overlays, cams.csv (worst first) and cam_grid.png for the `limit` worst-ranked images; under
    multi-label, a map per predicted label (cams/<stem>_<label>.png)."""
    from classifier.evaluation.cams import GRID_EXAMPLES, Example, cam_grid_figure, class_activation_maps, overlay

    classes, labels, net = predictor.class_names, images.labels, predictor.net
    thresholds = net.thresholds.cpu().numpy() if net.multilabel else None
    reading = Reading(classes, predictor.predict(images.paths).numpy(), labels, thresholds)
    if thresholds is not None:
        order = worst_sets_first(reading.probs, labels, thresholds)[:limit]
        jobs = [(i, k) for i in order for k in mapped_labels(reading, i, target)]
        names = unique_names([Path(f"{images.paths[i].stem}_{classes[k]}.png") for i, k in jobs])
    else:
        targets = {"pred": reading.predicted, "true": labels}.get(target)
        if targets is None:
            targets = np.full(len(reading.probs), classes.index(target))
        order = worst_first(reading.probs, labels)[:limit]
        jobs = [(i, int(targets[i])) for i in order]
        names = unique_names([images.paths[i] for i, _ in jobs])
    (folder / "cams").mkdir(exist_ok=True)
    rows, examples = [], []
    for batch, pixels in batches(predictor, [images.paths[i] for i, _ in jobs], predictor.batch_size):
        chosen = jobs[batch.start : batch.stop]
        maps = class_activation_maps(net, normalised(predictor, pixels), [k for _, k in chosen], method, layer)
        for (i, k), name, image, cam in zip(chosen, names[batch.start : batch.stop], pixels, maps, strict=True):
            shown = overlay(image, cam)
            Image.fromarray(shown).save(folder / "cams" / name)
            peak_y, peak_x = np.unravel_index(cam.argmax(), cam.shape)
            path = images.paths[i]
            rows.append([*reading.row(i, k, path), f"{cam.mean():.4g}", int(peak_x), int(peak_y), f"cams/{name}"])
            if len(examples) < GRID_EXAMPLES:
                caption, mistake = reading.caption(i, k, path), reading.mistake(i, k)
                examples.append(Example(image.permute(1, 2, 0).numpy(), shown, caption, mistake))
    with atomic_open(folder / "cams.csv", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CAM_COLUMNS if thresholds is None else LABEL_CAM_COLUMNS)
        writer.writerows(rows)
    order_said = "mistakes first, by loss" if labels is not None else "least confident first"
    title = f"{method} of {layer} on {images.source}: {order_said}"
    save_figure(cam_grid_figure(examples, title), folder / "cam_grid.png")
    log.info("%s maps of %s for %d images (%s): %s", method, layer, len(order), order_said, folder)


def mapped_labels(reading: Reading, row: int, target: str) -> list[int]:
    """Multi-label: the labels one image's maps explain: the predicted ones (true: the given ones; or the one named),
    the most probable label when there are none."""
    if target in ("pred", "true"):
        chosen = np.flatnonzero(reading.predicted[row] if target == "pred" else reading.labels[row])
        return chosen.tolist() or [int(reading.probs[row].argmax())]
    return [reading.classes.index(target)]


def worst_sets_first(probs: np.ndarray, labels: np.ndarray | None, thresholds: np.ndarray) -> np.ndarray:
    """Multi-label image order: images with a wrong decision first, then the others, each by loss (the mean binary
    cross-entropy) from the highest; without labels, the image with a probability nearest its threshold first."""
    if labels is None:
        return np.argsort(np.abs(probs - thresholds).min(axis=1), kind="stable")
    clipped = np.clip(probs, 1e-12, 1 - 1e-12)
    loss = -np.where(labels == 1, np.log(clipped), np.log1p(-clipped)).mean(axis=1)
    correct = ((probs >= thresholds) == (labels == 1)).all(axis=1)
    return np.lexsort((-loss, correct))


def label_set(row: np.ndarray, classes: list[str]) -> str:
    """A 0/1 (or boolean) row as its labels, `;`-joined as in splits.csv ("" for none)."""
    return LABEL_SEPARATOR.join(classes[k] for k in np.flatnonzero(row))


def write_embeddings(
    predictor: Predictor, images: Images, folder: Path, limit: int | None, projection: str, seed: int
) -> None:
    """embeddings.npy (the penultimate features), embeddings.csv with their 2-D map, embedding.png, and the
    projector files in projector/, for `limit` images spread over `images` (all by default)."""
    rows = np.arange(len(images.paths))
    if limit is not None and limit < len(rows):
        rows = np.unique(np.linspace(0, len(rows) - 1, limit).round().astype(int))
    paths = [images.paths[i] for i in rows]
    labels = None if images.labels is None else images.labels[rows]
    side = sprite_thumb_size(len(paths))
    features, logits, thumbs = [], [], []
    with torch.inference_mode():
        for _, pixels in batches(predictor, paths, predictor.batch_size):
            batch_features, batch_logits = penultimate(predictor.net, normalised(predictor, pixels))
            features.append(batch_features.float().cpu())
            logits.append(batch_logits.float().cpu())
            if side:
                thumbs.append(thumbnails(pixels, side))
    features_np = torch.cat(features).numpy()
    net, classes = predictor.net, predictor.class_names
    thresholds = net.thresholds.cpu().numpy() if net.multilabel else None
    reading = Reading(classes, net.probabilities(torch.cat(logits)).numpy(), labels, thresholds)
    xy = project(features_np, projection, seed)
    metadata = [[str(path), *reading.said(k)] for k, path in enumerate(paths)]
    np.save(folder / "embeddings.npy", features_np)
    with atomic_open(folder / "embeddings.csv", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "prediction", "x", "y"])
        writer.writerows([*row, f"{x:.7g}", f"{y:.7g}"] for row, (x, y) in zip(metadata, xy, strict=True))
    mistakes = np.array([reading.wrong(k) for k in range(len(paths))], dtype=bool)
    title = f"{'t-SNE' if projection == 'tsne' else 'PCA'} of the penultimate features, {images.source}"
    top = reading.probs.argmax(axis=1)  # multi-label: coloured by the most probable label
    colour_by = top if labels is None or net.multilabel else labels
    save_figure(embedding_figure(xy, colour_by, mistakes, classes, title), folder / "embedding.png")
    write_projector(folder / "projector", features_np, metadata, torch.cat(thumbs) if thumbs else None)
    log.info(
        "Embeddings of %d images (%d features each): %s\nProjector: tensorboard --logdir %s",
        len(paths), features_np.shape[1], folder, folder / "projector",
    )  # fmt: skip
