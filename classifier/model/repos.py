"""Hugging Face model repos in timm's format (config.json and model.safetensors, as `classifier push` writes them and
timm's `push_to_hf_hub` does): where one is, and fine-tuning from its weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from classifier.model.backbones import load_local_weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HUB, LOCAL = "hf-hub:", "local-dir:"
OURS = "classifier"  # config.json's key for what timm has no field for: task, temperature, thresholds, rejection


def is_repo(source: object) -> bool:
    """Whether --model.pretrained names a model repo (hf-hub:ID, local-dir:PATH, or a folder holding config.json)
    rather than a weights file."""
    if not isinstance(source, str):
        return False
    return source.startswith((HUB, LOCAL)) or (Path(source) / CONFIG_FILE).is_file()


def repo_files(source: str, option: str = "--model.pretrained") -> tuple[dict[str, Any], Path]:
    """(config.json as a dict, the weights file) of the repo at `source`: a folder, local-dir:PATH, or hf-hub:ID
    (downloaded into the Hugging Face cache, or read from it offline)."""
    if source.startswith(HUB):
        from huggingface_hub import hf_hub_download  # installed with timm

        repo_id = source.removeprefix(HUB)
        try:
            config, weights = (Path(hf_hub_download(repo_id, name)) for name in (CONFIG_FILE, WEIGHTS_FILE))
        except Exception as error:  # noqa: BLE001 - offline, no such repo, no access: each client error its own type
            raise ConnectionError(
                f"{option} {source}: could not fetch {repo_id}'s {CONFIG_FILE} and {WEIGHTS_FILE} from the Hugging "
                f"Face hub ({type(error).__name__}); go online (HF_TOKEN for a private repo), or pass the repo's folder"
            ) from None
    else:
        folder = Path(source.removeprefix(LOCAL))
        config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in (config, weights):
            if not path.is_file():
                raise FileNotFoundError(f"{option} {source}: {path} does not exist (a model repo holds both files)")
    return json.loads(config.read_text()), weights


def load_repo_weights(model: nn.Module, source: str, backbone: str, class_names: list[str]) -> None:
    """Fine-tune from a repo: its weights into `model` (built by `create_backbone` for `backbone`), its head kept
    when its classes are ours, in our order, and replaced otherwise."""
    config, weights = repo_files(source)
    if config.get("architecture") != backbone:
        raise ValueError(
            f"--model.pretrained {source} holds a {config.get('architecture')} and --model.backbone is {backbone}: "
            f"pass --model.backbone {config.get('architecture')}"
        )
    same_classes = list(config.get("label_names") or []) == list(class_names)
    load_local_weights(model, weights, keep_head=same_classes, option=f"--model.pretrained {source}")
