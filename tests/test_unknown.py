"""Unknown images out: `classifier calibrate` fits a rejection threshold on the frozen validation split, and predict,
`Predictor`, `OnnxPredictor` and `serve` mark the images under it unknown; photo-like shapes are the unknowns of a
digits model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import timm
import torch
from PIL import Image

from classifier import OnnxPredictor, Predictor, cli_main
from classifier.cli.entry import main
from classifier.serve.app import create_app
from classifier.serve.backends import load_backend
from tests.helpers import read_csv, run_dir

CLASSES = [str(digit) for digit in range(10)]


def calibrated(run: Path) -> Path:
    return run_dir(run, 0) / "checkpoints" / "best-calibrated.ckpt"


def saved_rejection(run: Path) -> dict:
    return torch.load(calibrated(run), weights_only=True)["net"]["rejection"]


def independent_energy(checkpoint: Path, paths: list[Path]) -> np.ndarray:
    """logsumexp of the calibrated logits, from plain timm and PIL: resize 8 -> 33 px (32 / test_resnet's crop_pct
    0.95), crop 32, normalise, divide by the temperature."""
    saved = torch.load(checkpoint, weights_only=True)
    model = timm.create_model("test_resnet", num_classes=10)
    state = saved["state_dict"]
    model.load_state_dict({k.removeprefix("net.backbone."): v for k, v in state.items() if k.startswith("net.")})
    mean, std = np.array(model.pretrained_cfg["mean"]), np.array(model.pretrained_cfg["std"])
    pixels = [np.asarray(Image.open(p).convert("RGB").resize((33, 33), Image.BILINEAR))[:32, :32] for p in paths]
    images = torch.from_numpy((np.stack(pixels) / 255.0 - mean) / std).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        logits = model.eval()(images) / saved["net"]["temperature"]
    return torch.logsumexp(logits, dim=1).numpy()


def test_calibrate_stores_the_threshold_that_keeps_95_percent_of_validation(
    unknown_run: Path, digits_dir: Path
) -> None:
    checkpoint = calibrated(unknown_run)
    saved = torch.load(checkpoint, weights_only=True)
    rejection = saved["net"]["rejection"]
    assert saved["hyper_parameters"]["rejection"] == rejection and set(rejection) == {"score", "threshold", "keep"}
    assert rejection["score"] == "energy" and rejection["keep"] == 0.95
    splits = read_csv(run_dir(unknown_run, 0) / "splits.csv")
    report = json.loads(checkpoint.with_suffix(".json").read_text())["rejection"]
    for split in ("val", "test"):
        energy = independent_energy(checkpoint, [digits_dir / row["path"] for row in splits if row["split"] == split])
        if split == "val":
            expected = np.quantile(energy, 0.05, method="lower")  # one of the scores: at least 95% at or above it
            assert rejection["threshold"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
            assert (energy >= expected).mean() >= 0.95
        assert report["unknown"][split] == pytest.approx((energy < rejection["threshold"]).mean(), abs=1e-5)


def test_predict_marks_the_shapes_unknown_and_reject_false_gives_them_a_class(
    unknown_run: Path, tmp_path: Path
) -> None:
    checkpoint, mixed = calibrated(unknown_run), unknown_run / "mixed"
    threshold = saved_rejection(unknown_run)["threshold"]
    rows = {}
    for reject in ("true", "false"):
        output = tmp_path / f"reject_{reject}.csv"
        cli_main(["predict", "--ckpt_path", str(checkpoint), "--data.predict_dir", str(mixed), "--data.num_workers",
                  "0", "--predictions.output", str(output), "--model.reject", reject])  # fmt: skip
        rows[reject] = {Path(row["path"]).name: row for row in read_csv(output)}
    assert list(next(iter(rows["true"].values())))[:5] == ["path", "prediction", "confidence", "ood_score", "status"]
    assert "ood_score" not in next(iter(rows["false"].values()))
    unknown = {name for name, row in rows["true"].items() if row["prediction"] == "unknown"}
    for name, row in rows["true"].items():
        probs = [float(row[f"prob_{c}"]) for c in CLASSES]
        top = CLASSES[int(np.argmax(probs))]
        assert (name in unknown) == (float(row["ood_score"]) < threshold)
        assert float(row["confidence"]) == max(probs) and rows["false"][name]["prediction"] == top
        assert name in unknown or row["prediction"] == top
    shapes = {name for name in rows["true"] if name.startswith("shape_")}
    assert len(unknown & shapes) > len(shapes) / 2 and len(unknown - shapes) <= 1  # most of the shapes, few digits


def test_predictor_and_onnx_predictor_classify_alike_and_an_older_export_cannot_reject(
    unknown_run: Path, tmp_path: Path
) -> None:
    paths = sorted((unknown_run / "mixed").iterdir())
    predictor, exported = Predictor.from_checkpoint(calibrated(unknown_run)), unknown_run / "export" / "model.onnx"
    onnx_predictor = OnnxPredictor(exported)
    assert onnx_predictor.rejection == predictor.rejection == predictor.net.rejection
    assert json.loads((exported.parent / "preprocess.json").read_text())["rejection"] == predictor.rejection
    ours, theirs = predictor.classify(paths), onnx_predictor.classify(paths)
    assert [r.labels for r in ours] == [r.labels for r in theirs]
    assert [r.unknown for r in ours] == [r.unknown for r in theirs] and any(r.unknown for r in ours)
    np.testing.assert_allclose([r.score for r in ours], [r.score for r in theirs], atol=1e-4)
    probabilities = predictor.predict(paths).numpy()  # predict() stays the N x C probabilities
    np.testing.assert_allclose(onnx_predictor.predict(paths), probabilities, atol=1e-4)
    for result, row in zip(ours, probabilities, strict=True):
        top = CLASSES[int(row.argmax())]
        assert result.unknown == (result.score < predictor.rejection["threshold"])
        assert (result.labels, result.prediction) == (([], "unknown") if result.unknown else ([top], top))
        assert result.probability == pytest.approx(row.max(), abs=1e-6)
    tops = [CLASSES[i] for i in probabilities.argmax(1)]
    assert [r.labels for r in predictor.classify(paths, reject=False)] == [[top] for top in tops]
    assert onnx_predictor.classify(paths[-1], reject=False).prediction == tops[-1]

    older = onnx.load(exported)  # as exported before the score: one output
    del older.graph.output[1]
    onnx.save(older, older_path := tmp_path / "model.onnx")
    before = OnnxPredictor(older_path)
    results = before.classify(paths)
    assert before.rejection is None and all(r.score is None and not r.unknown for r in results)
    assert [r.labels for r in results] == [r.labels for r in predictor.classify(paths, reject=False)]


async def answers(backend, *paths: Path) -> list[dict]:
    app = create_app(backend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            files = [("files", (path.name, path.read_bytes(), "application/octet-stream")) for path in paths]
            response = await client.post("/predict", files=files)
            info = (await client.get("/info")).json()
    assert response.status_code == 200
    return [info, *response.json()["results"]]


@pytest.mark.parametrize("model", ["checkpoint", "onnx"])
def test_serve_answers_unknown_for_a_shape_with_its_probabilities_and_score(unknown_run: Path, model: str) -> None:
    path = calibrated(unknown_run) if model == "checkpoint" else unknown_run / "export" / "model.onnx"
    mixed = sorted((unknown_run / "mixed").iterdir())
    expected = Predictor.from_checkpoint(calibrated(unknown_run)).classify(mixed)
    (shape, verdict), (digit, known) = [
        next((p, r) for p, r in zip(mixed, expected, strict=True) if r.unknown == unknown) for unknown in (True, False)
    ]
    info, shape_answer, digit_answer = asyncio.run(answers(load_backend(path), shape, digit))
    assert info["rejection"] == saved_rejection(unknown_run)
    assert shape_answer["prediction"] == "unknown" and shape_answer["unknown"] is True
    assert shape_answer["ood_score"] == pytest.approx(verdict.score, abs=1e-4)
    assert shape_answer["top"][0]["probability"] == pytest.approx(verdict.probability, abs=1e-4)
    assert (digit_answer["prediction"], digit_answer["unknown"]) == (known.labels[0], False)
    _, unrejected = asyncio.run(answers(load_backend(path, reject=False), shape))
    top = max(verdict.probabilities, key=verdict.probabilities.get)
    assert "unknown" not in unrejected and unrejected["top"][0]["class"] == top


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ood_score", "entropy"], "error: --ood_score 'entropy': choose one of energy, msp"),
        (["--keep", "1.5"], "error: --keep 1.5: the share of validation images to keep known is over 0 and at most 1"),
    ],
)
def test_calibrate_refuses_a_bad_score_or_share_in_one_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["calibrate", "--ckpt_path", str(tmp_path / "best.ckpt"), *flags])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [message, "(--debug or CLASSIFIER_DEBUG=1 shows the traceback)"]


def test_a_multilabel_image_is_unknown_only_with_no_label_and_a_low_joint_energy(
    multilabel_run: Path, tmp_path: Path
) -> None:
    output = tmp_path / "calibrated.ckpt"
    cli_main(["calibrate", "--ckpt_path", str(run_dir(multilabel_run, 0) / "checkpoints" / "best.ckpt"), "--output",
              str(output), "--keep", "0.5", "--data.num_workers", "0"])  # fmt: skip
    predictor = Predictor.from_checkpoint(output)
    assert predictor.rejection["score"] == "energy" and predictor.rejection["keep"] == 0.5
    images = sorted((multilabel_run / "scenes" / "images").iterdir())[:40]
    decided, labelled = predictor.classify(images), predictor.classify(images, reject=False)
    low = [result.score < predictor.rejection["threshold"] for result in decided]
    for result, plain, under in zip(decided, labelled, low, strict=True):
        assert result.unknown == (under and not plain.labels)
        assert result.labels == ([] if result.unknown else plain.labels)
    kept = sum(under and bool(plain.labels) for under, plain in zip(low, labelled, strict=True))
    assert kept and any(result.unknown for result in decided)  # low scores with a label stay known
