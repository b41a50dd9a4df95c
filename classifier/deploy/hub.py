"""A checkpoint as a Hugging Face model repo in timm's format: `config.json` and `model.safetensors` that
`timm.create_model("hf-hub:ID" or "local-dir:PATH", pretrained=True)` builds, a model card whose numbers are the
test run's own, and the upload. The way back is `ClassifierNet.from_repo` and `--model.pretrained`."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from timm.models import save_for_hf

from classifier.deploy.export import export_checkpoint
from classifier.deploy.model_card import ModelCard, tested_metrics
from classifier.model.checkpoints import read_checkpoint
from classifier.model.net import ClassifierNet
from classifier.model.repos import OURS

log = logging.getLogger(__name__)

PREPROCESSING_TO_TIMM = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def hub_login(repo_id: str) -> Any:
    """The HfApi for an upload to `repo_id`, its token checked before any work: a missing network or token ends in
    one line."""
    from huggingface_hub import HfApi

    if repo_id.count("/") != 1:
        raise ValueError(f"--repo_id {repo_id}: give it as user/name (or organisation/name)")
    api = HfApi()
    try:
        api.whoami()
    except Exception as error:  # noqa: BLE001 - offline, no token, a bad token: each its own type
        raise ConnectionError(
            f"--repo_id {repo_id}: the Hugging Face hub did not accept this machine's token ({type(error).__name__}); "
            "go online and set HF_TOKEN or run `hf auth login`, or leave out --repo_id to write the folder only"
        ) from None
    return api


def write_repo(ckpt_path: Path, output: Path, license: str, with_onnx: bool, repo_id: str | None = None) -> Path:
    """The repo folder: timm's config.json and model.safetensors, the model card with the confusion matrix, and
    with `with_onnx` the ONNX export (model.onnx, preprocess.json, parity.json)."""
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"--output {output} exists and is not empty: give a new folder")
    checkpoint = read_checkpoint(ckpt_path, "--ckpt_path")
    net = ClassifierNet.from_checkpoint(checkpoint, f"--ckpt_path {ckpt_path}")
    if net.head_hidden_dims:
        raise ValueError(
            f"--ckpt_path {ckpt_path} has an MLP head (--model.head_hidden_dims {net.head_hidden_dims}), "
            "which timm cannot build: a timm repo holds a timm model, its head a single layer"
        )
    metrics, report = tested_metrics(ckpt_path)  # before any file is written: a model card needs them
    if with_onnx:  # first: export replaces its whole output folder
        export_checkpoint(ckpt_path, output=output)
    ours = checkpoint["net"] | {"thresholds": net.thresholds.tolist() if net.multilabel else None}
    data_config = {key: net.preprocessing[key] for key in PREPROCESSING_TO_TIMM if key in net.preprocessing}
    model_config = {"label_names": net.class_names, OURS: ours, "pretrained_cfg": {"license": license}}
    save_for_hf(net.backbone, str(output), model_config=model_config, data_config=data_config, safe_serialization=True)
    figure = report / "confusion_matrix.png"
    if figure.is_file():
        shutil.copy(figure, output / figure.name)
    card = ModelCard(ckpt_path, checkpoint, net, metrics, report)
    card.write(output / "README.md", figure.is_file(), license, repo_id)
    return output


def upload(api: Any, folder: Path, repo_id: str, public: bool) -> str:
    """The folder as the model repo `repo_id` (made private unless `public`); returns its URL."""
    url = api.create_repo(repo_id, repo_type="model", private=not public, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="classifier push")
    return str(url)
