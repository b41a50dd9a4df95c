"""The engine of `classifier export`: a checkpoint as ONNX, a torch.export program or TorchScript, with its
preprocessing (`preprocess.json`), its parity with PyTorch proven on real images (`parity.json`), and optionally
int8."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from classifier.core.atomic import PARTIAL_SUFFIX, replace_folder, write_json
from classifier.core.errors import ParityError
from classifier.deploy.onnx_predictor import SCORE_OUTPUT
from classifier.deploy.parity import (
    BATCH_SIZES,
    CHECK_IMAGES,
    calibration_images,
    check_images,
    check_parity,
    check_quantized,
)
from classifier.deploy.predictor import Predictor
from classifier.deploy.preprocess import METADATA_KEY, PARITY_FILE, checked, describe, file_sha256, write_preprocess
from classifier.deploy.run_metrics import run_test_metrics
from classifier.model.checkpoints import read_checkpoint
from classifier.model.net import ClassifierNet, normalisation
from classifier.model.ood import scored_logits
from classifier.model.tta import TTA, predict_logits

log = logging.getLogger(__name__)

FILES = {"onnx": "model.onnx", "exported_program": "model.pt2", "torchscript": "model.torchscript.pt"}
INT8_FILE = "model.int8.onnx"
INPUT, OUTPUT = "images", "probabilities"  # the graph's input and output names


class ExportedModel(nn.Module):
    """What is exported: uint8 NCHW images in, class probabilities (or logits) out; float conversion, the
    checkpoint's normalisation, its test-time augmentation and the network inside the graph. The probabilities are
    the network's own: a softmax over the classes, or one sigmoid per label for a multi-label network.

    With `scores` (ONNX's, for a network calibrated with a rejection), a second output: each image's
    `classifier.model.ood.ood_score` of the rejection's kind, which a torch-free consumer compares with the threshold
    in preprocess.json."""

    def __init__(self, net: ClassifierNet, tta: TTA | None = None, softmax: bool = True, scores: bool = False) -> None:
        super().__init__()
        self.net = net
        self.tta = tta
        self.softmax = softmax
        self.scores = scores
        mean, std = normalisation(net.preprocessing)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        images = (images.float() - self.mean) / self.std
        if not self.scores:
            logits = predict_logits(self.net, images, self.tta, self.net.multilabel)
            return self.net.probabilities(logits) if self.softmax else logits.float()
        logits, scores = scored_logits(self.net, images, self.tta, self.net.rejection, self.net.multilabel)
        return self.net.probabilities(logits) if self.softmax else logits.float(), scores


def export_net(
    net: ClassifierNet,
    path: Path,
    format: str = "onnx",
    description: dict | None = None,
    tta: TTA | None = None,
    softmax: bool = True,
    dynamic_batch: bool = True,
    opset: int = 18,
) -> dict:
    """Write `net` (in eval mode, whatever its mode now) to `path` as `format`, with `description` (preprocess.json)
    inside the file; returns the description with the exporter that was used."""
    # a copy: the caller's network keeps its mode; the ONNX graph of a network that rejects also outputs the scores,
    # which torch-free consumers need; without a rejection, it stays one output, as exports always were
    model = ExportedModel(copy.deepcopy(net), tta, softmax, scores=format == "onnx" and net.rejection is not None)
    model.eval().requires_grad_(False)

    _, height, width = net.preprocessing["input_size"]
    # size-1 dimensions get specialised, so a dynamic batch is traced at 2
    example = torch.randint(0, 256, (2 if dynamic_batch else 1, 3, height, width), dtype=torch.uint8)
    description = {**(description or {}), "output": "probabilities" if softmax else "logits"}
    description |= {"format": format, "dynamic_batch": dynamic_batch, "tta": tta}
    if format == "onnx":
        description |= {"exporter": _export_onnx(model, example, path, dynamic_batch, opset), "opset": opset}
        embed_metadata(path, description)
        return description
    description |= {"opset": None}
    if format == "exported_program":
        batch = {0: torch.export.Dim("batch", max=4096)} if dynamic_batch else None
        program = torch.export.export(model, (example,), dynamic_shapes=(batch,))
        description["exporter"] = "torch.export"
        torch.export.save(program, path, extra_files={"preprocess.json": json.dumps(description)})
    elif format == "torchscript":
        log.warning("TorchScript is deprecated upstream (PyTorch recommends torch.export); traced with torch.jit")
        description["exporter"] = "torch.jit.trace"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation, said once above
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(path), _extra_files={"preprocess.json": json.dumps(description)})
    else:
        raise ValueError(f"--format {format}: choose one of {', '.join(FILES)}")
    return description


def _export_onnx(model: ExportedModel, example: Tensor, path: Path, dynamic_batch: bool, opset: int) -> str:
    """torch.onnx's dynamo exporter, else its TorchScript-based one; returns which one wrote the file."""
    outputs = [OUTPUT, SCORE_OUTPUT] if model.scores else [OUTPUT]
    names = {"input_names": [INPUT], "output_names": outputs, "opset_version": opset, "verbose": False}
    try:
        batch = {0: torch.export.Dim("batch", max=4096)} if dynamic_batch else None
        torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=(batch,), external_data=False, **names)
        exporter = "dynamo"
    except Exception as error:  # noqa: BLE001 - any failure of the new exporter means: try the old one
        log.warning("The dynamo ONNX exporter failed (%s); using the TorchScript-based one", str(error)[:300])
        axes = {name: {0: "batch"} for name in (INPUT, *outputs)} if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation warning: the log line says which exporter ran
            torch.onnx.export(model, (example,), path, dynamo=False, dynamic_axes=axes, **names)
        exporter = "torchscript"
    log.info("ONNX exporter: %s (opset %d)", exporter, opset)
    return exporter


def embed_metadata(path: Path, description: dict) -> None:
    """Store preprocess.json in the ONNX file's `metadata_props`, so the model file alone says how to feed it."""
    import onnx

    model = onnx.load(path)
    del model.metadata_props[:]
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(description))
    onnx.save(model, path)


def writable_folder(folder: Path, output: Path) -> Path:
    """`folder` (the output's, or the output itself), created, once a file could be written in it; a one-line error
    naming `output` otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"--output {output} is not writable: {error.strerror or error}") from error
    return folder


def export_checkpoint(
    ckpt_path: str | Path,
    format: str = "onnx",
    output: str | Path | None = None,
    dynamic_batch: bool = True,
    opset: int = 18,
    quantize: str = "none",
    check: str = "auto",
    softmax: bool = True,
    max_accuracy_drop: float = 1.0,
    data_dir: str | None = None,
    check_images_max: int = CHECK_IMAGES,
) -> Path:
    """Export, describe and check one checkpoint; returns the output folder. Everything is written into a folder of
    its own beside the output, which replaces the output only once parity passed: a failed export leaves the
    previous one as it was (and its own files in `<output>.failed/`), and no file of an earlier export stays."""
    if format not in FILES:
        raise ValueError(f"--format {format}: choose one of {', '.join(FILES)}")
    if quantize not in ("none", "int8") or (quantize == "int8" and format != "onnx"):
        raise ValueError(f"--quantize {quantize}: int8 is for --format onnx; otherwise none")
    ckpt_path = Path(ckpt_path)
    checkpoint = read_checkpoint(ckpt_path)
    predictor = Predictor.from_checkpoint(ckpt_path)
    target = Path(output) if output else ckpt_path.parent / "export"
    thresholds = None if predictor.thresholds is None else predictor.thresholds.tolist()
    source = describe(
        checkpoint["net"], file_sha256(ckpt_path), run_test_metrics(ckpt_path), thresholds, model=FILES[format]
    )
    if format == "onnx":  # its consumers preprocess without torch: refuse a crop they would get wrong
        checked(source, f"--ckpt_path {ckpt_path}")
    images = None
    if check != "none":
        images = check_images(check, predictor, checkpoint, ckpt_path, data_dir, check_images_max)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=writable_folder(target.parent, target))
    )
    try:
        path = staging / FILES[format]
        description = export_net(predictor.net, path, format, source, predictor.tta, softmax, dynamic_batch, opset)
        report = {"checkpoint": str(ckpt_path), "model": path.name, "format": format}
        report["exporter"] = description["exporter"]
        if images is not None:
            report |= check_parity(predictor, path, description, images, BATCH_SIZES)
        if quantize == "int8":
            quantized = staging / INT8_FILE
            calibration = calibration_images(checkpoint, ckpt_path, data_dir, images, predictor)
            int8 = {**description, "model": INT8_FILE, "quantization": "int8"}
            quantize_int8(path, quantized, calibration.batches, int8)
            description["int8_model"] = INT8_FILE
            if images is not None:
                report["int8"] = check_quantized(quantized, images, calibration, max_accuracy_drop)
        write_preprocess(staging, description)
        if images is not None:
            write_json(staging / PARITY_FILE, report)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    failures = [message for message in (report.get("failure"), report.get("int8", {}).get("failure")) if message]
    if failures:
        failed = replace_folder(staging, target.with_name(f"{target.name}.failed"))
        kept = f"; {target} is unchanged" if target.exists() else ""
        raise ParityError(f"{failed / path.name}: " + "; ".join(failures) + f" (see {failed / PARITY_FILE}{kept})")
    replace_folder(staging, target)
    log.info("Exported %s to %s", ckpt_path, target / path.name)
    if images is not None:
        log.info("Parity report: %s", target / PARITY_FILE)
    return target


def quantize_int8(model: Path, output: Path, calibration: list, description: dict) -> None:
    """onnxruntime static int8 quantization, QDQ with per-channel weights, calibrated on uint8 NCHW batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    prepared = output.with_suffix(".prepared.onnx")
    try:
        quant_pre_process(str(model), str(prepared))
        quantize_static(
            str(prepared),
            str(output),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)
    embed_metadata(output, description)
    log.info("int8 model (static QDQ, calibrated on %d images): %s", sum(len(b) for b in calibration), output)
