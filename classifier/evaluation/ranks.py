"""Per-image results that each rank computed for its share of the images, put back together in row order."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def gathered_by_row(batches: list[tuple[Tensor, ...]]) -> list[Tensor] | None:
    """Every rank's batches of columns (the first column: row indices), each column concatenated and ordered by row;
    None when no rank has any. Under DDP each rank evaluates its own images, so every rank must call this."""
    local = [torch.cat(column) for column in zip(*batches, strict=True)] if batches else None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, local)
        shares = [share for share in everyone if share is not None]
        local = [torch.cat(column) for column in zip(*shares, strict=True)] if shares else None
    if local is None:
        return None
    order = local[0].argsort()
    return [column[order] for column in local]
