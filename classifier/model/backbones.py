"""timm backbones: creation by name, pretrained weights from the hub or a local file, and their data config."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import timm
from torch import nn

from classifier.core.geometry import image_hw
from classifier.model.checkpoints import loading

log = logging.getLogger(__name__)


def check_backbone_name(name: str) -> None:
    """Fail early, with the closest timm names, instead of timm's bare `Unknown model`."""
    if timm.is_model(name):
        return
    matches = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(matches)}?" if matches else " See timm.list_models() for the names."
    raise ValueError(f"--model.backbone {name!r} is not a timm model.{hint}")


def backbone_data_config(name: str) -> dict[str, Any]:
    """Input size, interpolation, mean/std and crop percentage the backbone was trained with."""
    check_backbone_name(name)
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    return timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})


def backbone_kwargs(
    name: str, num_classes: int, drop_rate: float = 0.0, image_size: int | list[int] | None = None
) -> dict:
    """timm's `create_model` arguments for our head size, dropout and, for fixed-size models, input size."""
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_rate": drop_rate}
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if image_size and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = image_hw(image_size)  # ViT-style models build position embeddings for one size
    return kwargs


def create_backbone(
    name: str, num_classes: int, drop_rate: float = 0.0, image_size: int | list[int] | None = None
) -> nn.Module:
    """A timm model with a fresh `num_classes` head and random weights; `load_pretrained` fills it for a fit."""
    check_backbone_name(name)
    return timm.create_model(name, **backbone_kwargs(name, num_classes, drop_rate, image_size))


def load_pretrained(model: nn.Module, name: str, pretrained: bool | str, kwargs: dict[str, Any]) -> None:
    """Load the hub's weights (`pretrained` True) or a local file's into `model`, built by `create_backbone`."""
    if pretrained is True:
        try:
            hub = timm.create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as error:  # offline, no network, or nothing on the hub for `name`
            raise ConnectionError(  # an OSError: the command prints it on one line
                f"--model.pretrained true: could not download the pretrained weights of {name!r} from the "
                f"Hugging Face hub ({type(error).__name__}). Pass a local weights file "
                "(--model.pretrained path/to/weights.pth|.safetensors) or go online."
            ) from None  # the hub client's own chain of errors says no more than this
        # our head, not the hub model's freshly drawn one: it was built before DDP synced the ranks' weights
        head = _head_prefixes(hub)
        model.load_state_dict({k: v for k, v in hub.state_dict().items() if not k.startswith(head)}, strict=False)
    elif isinstance(pretrained, str) and pretrained:
        load_local_weights(model, Path(pretrained))


def load_local_weights(model: nn.Module, path: Path, keep_head: bool = True, option: str = "") -> None:
    """Load a timm/torchvision state dict or a checkpoint of this project, dropping a head of another shape (or any
    head, without `keep_head`: one trained for other classes). `option` names the source in errors."""
    option = option or f"--model.pretrained {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{option} does not exist")
    with loading("--model.pretrained", path):
        # weights_only (not the default before timm 1.0.26); unwraps state_dict/model, strips module.
        state = timm.models.load_state_dict(str(path), weights_only=True)
    for prefix in ("net.backbone.", "backbone."):  # a checkpoint of this project (before net.py: backbone.)
        if any(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
            break
    own = model.state_dict()
    head = _head_prefixes(model)
    dropped = [
        key
        for key, value in state.items()
        if key.startswith(head) and (not keep_head or own.get(key, value).shape != value.shape)
    ]
    dropped += [key for key in state if key.startswith(head) and key not in own]  # a model built without a head
    wrong = [key for key, value in state.items() if key in own and own[key].shape != value.shape and key not in dropped]
    missing = [key for key in own if key not in state and not key.startswith(head)]
    unexpected = [key for key in state if key not in own and key not in dropped]
    if wrong or missing or unexpected:
        raise ValueError(
            f"{option} does not fit {type(model).__name__}: "
            f"{len(wrong)} tensors of another shape {wrong[:3]}, {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    for key in dropped:
        del state[key]
    if dropped:
        why = "has another shape" if keep_head else "is for other classes"
        log.info("Pretrained head %s %s; it is dropped and trained from scratch.", ", ".join(dropped), why)
    model.load_state_dict(state, strict=False)
    log.info("Loaded pretrained weights from %s", path)


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the classifier head, from timm's pretrained_cfg."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{name}." for name in names)
