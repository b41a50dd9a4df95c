"""`classifier push --ckpt_path X --output DIR [--repo_id user/name]`: a checkpoint as a Hugging Face model repo
in timm's format, written to a folder and optionally uploaded (the engine: `classifier.deploy.hub`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from classifier.deploy.hub import hub_login, upload, write_repo

log = logging.getLogger(__name__)


def push(argv: list[str]) -> Path:
    """Write the repo folder, then upload it when --repo_id is given; returns the folder."""
    parser = argparse.ArgumentParser(
        prog="classifier push",
        description="Write a checkpoint as a Hugging Face model repo that timm loads as is (config.json, "
        "model.safetensors, a model card with the test run's metrics), and upload it with --repo_id.",
    )
    parser.add_argument("--ckpt_path", required=True, type=Path, help="the checkpoint, tested (`classifier test`)")
    parser.add_argument("--output", required=True, type=Path, help="a new folder for the repo")
    parser.add_argument("--license", default="other", help="the model card's license (default other)")
    parser.add_argument("--with_onnx", action="store_true", help="also model.onnx and preprocess.json, parity checked")
    parser.add_argument("--repo_id", help="upload to this user/name repo (token: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--public", action="store_true", help="make a new repo public (default private)")
    options = parser.parse_args(argv)
    api = hub_login(options.repo_id) if options.repo_id else None  # before any work: offline fails here
    folder = write_repo(options.ckpt_path, options.output, options.license, options.with_onnx, options.repo_id)
    log.info("Wrote the model repo %s; load it with timm.create_model('local-dir:%s', pretrained=True)", folder, folder)
    if api is not None:
        url = upload(api, folder, options.repo_id, options.public)
        log.info("Uploaded to %s (%s)", url, "public" if options.public else "private")
    return folder
