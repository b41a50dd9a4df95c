"""The model card of a pushed repo (its README.md): YAML front matter the hub reads (library, license, task,
`model-index` with the test metrics) and prose on the data, the training, the test and its limits. Every number is
read from the run's own files (metrics.json, the split table, the calibration report), never retyped."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from classifier.core.atomic import write_text
from classifier.data.splits import SPLITS
from classifier.model.net import ClassifierNet

INDEX_METRICS = {  # metrics.json's name -> (model-index type, name), the ones the hub shows
    "test/acc": ("accuracy", "Test accuracy"),
    "test/balanced_acc": ("accuracy", "Test balanced accuracy"),
    "test/f1_macro": ("f1", "Test macro F1"),
    "test/top5_acc": ("accuracy", "Test top-5 accuracy"),
    "test/map": ("map", "Test mAP"),
    "test/subset_acc": ("accuracy", "Test subset accuracy"),
}


def tested_metrics(ckpt_path: Path) -> tuple[dict[str, float], Path]:
    """(metrics.json, its folder) of `classifier test` on this checkpoint: its run's test/ folder, or the one test
    files a checkpoint outside a run under."""
    run = ckpt_path.resolve().parent.parent if ckpt_path.resolve().parent.name == "checkpoints" else None
    report = run / "test" if run is not None else ckpt_path.resolve().parent / "evaluations" / ckpt_path.stem / "test"
    metrics, config = report / "metrics.json", report / "config.yaml"
    tested = yaml.safe_load(config.read_text()).get("ckpt_path") if config.is_file() else None
    if not metrics.is_file() or tested is None or Path(tested).name != ckpt_path.name:
        raise FileNotFoundError(
            f"--ckpt_path {ckpt_path}: no test of it in {report} (the model card reports its test metrics); run "
            f"`classifier test --ckpt_path {ckpt_path}` first"
        )
    return json.loads(metrics.read_text()), report


@dataclass
class ModelCard:
    ckpt_path: Path
    checkpoint: dict
    net: ClassifierNet
    metrics: dict[str, float]
    report: Path

    @property
    def name(self) -> str:
        return f"{self.net.backbone_name}-{len(self.net.class_names)}-classes"

    def split_table(self) -> list[dict[str, str]]:
        table = (self.checkpoint.get("ImageFolderDataModule") or {}).get("splits")
        return list(csv.DictReader(io.StringIO(zlib.decompress(table).decode()))) if table else []

    def front_matter(self, license: str) -> dict[str, Any]:
        metrics = [
            {"type": kind, "value": round(self.metrics[key], 4), "name": name}
            for key, (kind, name) in INDEX_METRICS.items()
            if key in self.metrics
        ]
        data = (self.checkpoint.get("datamodule_hyper_parameters") or {}).get("data_dir") or "images"
        result = {
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"type": "imagefolder", "name": Path(str(data)).name, "split": "test"},
            "metrics": metrics,
        }
        return {
            "library_name": "timm",
            "license": license,
            "pipeline_tag": "image-classification",
            "tags": ["image-classification", "timm", "classifier", self.net.backbone_name],
            "model-index": [{"name": self.name, "results": [result]}],
        }

    def data_section(self) -> str:
        rows = self.split_table()
        if not rows:
            return "The checkpoint records no split table.\n"
        counts = {name: Counter() for name in SPLITS}
        for row in rows:
            for label in row["label"].split(";") if self.net.multilabel else [row["label"]]:
                if row["split"] in counts and label:
                    counts[row["split"]][label] += 1
        sizes = {name: sum(row["split"] == name for row in rows) for name in SPLITS}
        digest = hashlib.blake2b(zlib.decompress(self.checkpoint["ImageFolderDataModule"]["splits"]), digest_size=8)
        lines = ["| class | " + " | ".join(SPLITS) + " |", "|---|" + "---:|" * len(SPLITS)]
        lines += [
            f"| {name} | " + " | ".join(str(counts[s][name]) for s in SPLITS) + " |" for name in self.net.class_names
        ]
        total = ", ".join(f"{sizes[name]} {name}" for name in SPLITS)
        return (
            f"{len(rows)} images ({total}) of {len(self.net.class_names)} classes"
            f"{', several labels per image' if self.net.multilabel else ''}.\n\n"
            + "\n".join(lines)
            + f"\n\nThe split table (`splits.csv`: every image, its split and its content fingerprint) has the BLAKE2b "
            f"fingerprint `{digest.hexdigest()}`: a run on the same images and split has the same.\n"
        )

    def training_section(self) -> str:
        model = dict(self.checkpoint.get("hyper_parameters") or {})
        data = {
            key: value
            for key, value in (self.checkpoint.get("datamodule_hyper_parameters") or {}).items()
            if not key.startswith("_")
        }
        config = yaml.safe_dump({"model": model, "data": data}, sort_keys=False, default_flow_style=None)
        epochs = self.checkpoint.get("epoch")
        return f"Trained for {epochs + 1 if epochs is not None else '?'} epochs with:\n\n```yaml\n{config}```\n"

    def test_section(self, figure: bool) -> str:
        lines = ["| metric | value |", "|---|---:|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in sorted(self.metrics.items())]
        calibration = self.ckpt_path.with_suffix(".json")
        if calibration.is_file():
            report = json.loads(calibration.read_text())
            test = report.get("test") or report["val"]
            lines.append(
                f"\nCalibrated by temperature scaling (T = {report['temperature']:.4g}, on {report['val']['images']} "
                f"validation images): expected calibration error {test['before']['ece']:.4f} before and "
                f"{test['after']['ece']:.4f} after, on the {'test' if 'test' in report else 'validation'} images."
            )
        else:
            lines.append(f"\nNot calibrated (the temperature is {self.net.temperature:g}).")
        if figure:
            lines.append("\n![confusion matrix](confusion_matrix.png)")
        return "\n".join(lines) + "\n"

    def write(self, path: Path, figure: bool, license: str, repo_id: str | None) -> None:
        """README.md: the front matter, then the prose; `repo_id` names the repo in the snippets."""
        repo = repo_id or "USER/REPO"
        preprocessing = self.net.preprocessing
        _, height, width = preprocessing["input_size"]
        temperature = self.net.temperature
        scaled = (
            f" The checkpoint divides these logits by its temperature, {temperature:g} (`config.json`: "
            f"`classifier.temperature`), before its softmax."
            if temperature != 1.0
            else ""
        )
        front = yaml.safe_dump(self.front_matter(license), sort_keys=False)
        answers = "labels of its own" if self.net.multilabel else "one of its classes"
        answers += (
            ", unless its calibrated rejection marks an image unknown"
            if self.net.rejection
            else ", even for an image of none of them"
        )
        text = f"""---
{front}---

# {self.name}

A {self.net.backbone_name} fine-tuned with classifier to tell apart
{", ".join(self.net.class_names)}.

## Use

```python
import timm

model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()  # or "local-dir:PATH"
config = timm.data.resolve_data_config(model=model)
transform = timm.data.create_transform(**config)
labels = model.pretrained_cfg["label_names"]
```

It takes {height}x{width} images ({preprocessing.get("crop_mode", "center")} mode, crop_pct
{preprocessing.get("crop_pct")}, {preprocessing.get("interpolation")} interpolation, mean {preprocessing.get("mean")}
and std {preprocessing.get("std")}).{scaled} With classifier: `Predictor.from_pretrained("hf-hub:{repo}")`, or
fine-tune on your own classes with `classifier fit --model.pretrained hf-hub:{repo}`.

## Data

{self.data_section()}
## Training

{self.training_section()}
## Test

{self.test_section(figure)}
## Intended use and limits

For images like those it was trained on: the same kinds of scenes, sources and sizes. Its test images come from the
same collection as its training images, so the figures above are what to expect there, not on images from another
camera, place or time. It always answers with {answers}.
Check it on your own images before relying on it.
"""
        write_text(path, text)
