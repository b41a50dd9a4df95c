"""Multi-label models outside training: `classify` decides each label at the checkpoint's threshold, `classifier
export` writes sigmoid probabilities, the task and the thresholds and proves its label sets agree, and `classifier
serve` answers each image with its labels."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from classifier import OnnxPredictor, Predictor
from classifier.deploy import parity
from classifier.model.net import ClassifierNet
from classifier.serve.app import create_app
from classifier.serve.backends import load_backend
from tests.helpers import classifier_here, run_dir

LABELS = ["disc", "ring", "square", "stripes"]


@pytest.fixture(scope="module")
def fitted(multilabel_run: Path) -> dict:
    """The shared multi-label run (tests/conftest.py): its best.ckpt, its ONNX export and 40 of its scenes."""
    checkpoint = run_dir(multilabel_run, 0) / "checkpoints" / "best.ckpt"
    images = sorted((multilabel_run / "scenes" / "images").iterdir())[:40]
    return {"checkpoint": checkpoint, "export": multilabel_run / "export", "images": images}


def by_hand(probabilities: np.ndarray, thresholds: np.ndarray) -> list[list[str]]:
    return [[LABELS[j] for j in range(len(LABELS)) if row[j] >= thresholds[j]] for row in probabilities]


def test_classify_gives_each_label_at_or_over_the_checkpoints_threshold(fitted: dict) -> None:
    predictor = Predictor.from_checkpoint(fitted["checkpoint"])
    thresholds = torch.load(fitted["checkpoint"], weights_only=True)["state_dict"]["net.thresholds"].double().numpy()
    probabilities = predictor.predict(fitted["images"]).numpy()
    results = predictor.classify(fitted["images"])
    expected = by_hand(probabilities, thresholds)
    assert [result.labels for result in results] == expected
    assert len({tuple(labels) for labels in expected}) > 1  # the images do get different label sets
    for result, row in zip(results, probabilities, strict=True):
        assert result.probabilities == dict(zip(LABELS, row.tolist(), strict=True))
        assert result.thresholds == dict(zip(LABELS, thresholds.tolist(), strict=True))
    one = predictor.classify(fitted["images"][0])
    assert one.labels == expected[0] and predictor.task == "multilabel"

    assert all(result.labels == LABELS for result in predictor.classify(fitted["images"], thresholds=0.0))
    assert all(result.labels == [] for result in predictor.classify(fitted["images"], thresholds=1.01))
    disc_always = predictor.classify(fitted["images"], thresholds={"disc": 0.0})
    moved = thresholds.copy()
    moved[0] = 0.0
    assert [result.labels for result in disc_always] == by_hand(probabilities, moved)
    assert disc_always[0].thresholds["disc"] == 0.0 and disc_always[0].thresholds["ring"] == thresholds[1]
    listed = [0.5, 0.45, 0.55, 0.5]
    assert [r.labels for r in predictor.classify(fitted["images"], listed)] == by_hand(probabilities, np.array(listed))
    with pytest.raises(ValueError, match="unknown labels circle"):
        predictor.classify(fitted["images"], thresholds={"circle": 0.5})
    with pytest.raises(ValueError, match="3 thresholds for 4 labels"):
        predictor.classify(fitted["images"], thresholds=[0.5, 0.5, 0.5])


def test_a_single_label_model_classifies_as_its_top_class_and_refuses_thresholds(fitted: dict) -> None:
    torch.manual_seed(0)
    predictor = Predictor(ClassifierNet("test_resnet", ["a", "b", "c"], image_size=32))
    probabilities = predictor.predict(fitted["images"][:8]).numpy()
    results = predictor.classify(fitted["images"][:8])
    assert [result.labels for result in results] == [[["a", "b", "c"][i]] for i in probabilities.argmax(1)]
    assert all(result.thresholds is None for result in results) and predictor.thresholds is None
    with pytest.raises(ValueError, match="thresholds are for multi-label models"):
        predictor.classify(fitted["images"][:8], thresholds=0.5)


def test_the_onnx_export_carries_the_task_and_thresholds_and_its_label_sets_agree(fitted: dict) -> None:
    export, images = fitted["export"], fitted["images"]
    checkpoint = torch.load(fitted["checkpoint"], weights_only=True)
    thresholds = checkpoint["state_dict"]["net.thresholds"].tolist()
    description = json.loads((export / "preprocess.json").read_text())
    assert (description["task"], description["thresholds"], description["class_names"]) == (
        "multilabel", thresholds, LABELS,
    )  # fmt: skip
    report = json.loads((export / "parity.json").read_text())
    assert report["passed"] and report["task"] == "multilabel" and report["preprocessing_mismatches"] == 0
    assert report["count"] == 18  # the frozen test split
    for result in report["batch_sizes"].values():
        assert result["label_set_agreement"] == 1.0 and result["max_abs_diff"] <= 1e-4
        assert result["subset_accuracy"] == report["pytorch_subset_accuracy"]

    onnx, predictor = OnnxPredictor(export / "model.onnx"), Predictor.from_checkpoint(fitted["checkpoint"])
    assert onnx.task == "multilabel" and onnx.thresholds.tolist() == thresholds
    probabilities = predictor.predict(images).numpy()
    np.testing.assert_allclose(onnx.predict(images), probabilities, atol=1e-5)
    assert np.abs(onnx.predict(images).sum(1) - 1).max() > 0.1  # sigmoids per label, not a softmax over them
    exported, pytorch = onnx.classify(images), predictor.classify(images)
    assert [result.labels for result in exported] == [result.labels for result in pytorch]
    assert exported[0].thresholds == pytorch[0].thresholds
    override = {"square": 0.0, "stripes": 1.01}
    assert [r.labels for r in onnx.classify(images, override)] == [
        r.labels for r in predictor.classify(images, override)
    ]


def test_a_logits_export_gets_its_sigmoid_from_the_onnx_predictor(fitted: dict, tmp_path: Path) -> None:
    args = ["--ckpt_path", str(fitted["checkpoint"]), "--output", str(tmp_path), "--softmax", "false"]
    result = classifier_here("export", *args, "--check", "random")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] and report["images"] == "32 random images" and report["pytorch_subset_accuracy"] is None
    onnx = OnnxPredictor(tmp_path / "model.onnx")
    assert onnx.preprocessing["output"] == "logits"
    pixels = np.stack([onnx.preprocess(path) for path in fitted["images"]])
    (raw,) = onnx.session.run(None, {onnx.input.name: pixels})
    predictor = Predictor.from_checkpoint(fitted["checkpoint"])
    expected = predictor.predict(fitted["images"]).numpy()
    np.testing.assert_allclose(torch.from_numpy(raw).sigmoid().numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(onnx.predict(fitted["images"]), expected, atol=1e-5)
    assert [r.labels for r in onnx.classify(fitted["images"])] == [
        r.labels for r in predictor.classify(fitted["images"])
    ]


def test_parity_measures_label_sets_and_fails_when_one_label_crosses_its_threshold(
    fitted: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = Predictor.from_checkpoint(fitted["checkpoint"])
    checkpoint = torch.load(fitted["checkpoint"], weights_only=True)
    images = parity.check_images("auto", predictor, checkpoint, fitted["checkpoint"], None)
    assert images.labels.shape == (18, 4)  # the test split's label sets, as 0/1 rows
    decided = (images.reference >= predictor.thresholds).astype(int)
    description = {"format": "onnx", "output": "probabilities", "task": "multilabel"}
    model = fitted["export"] / "model.onnx"
    report = parity.check_parity(predictor, model, description, images)
    assert report["passed"] and report["pytorch_subset_accuracy"] == accuracy_score(images.labels, decided)

    # a threshold that sits on the first image's probability, and an export 1e-6 under it there: within the 1e-4 of
    # the probabilities, but the image loses the label
    images.thresholds = predictor.thresholds.copy()
    images.thresholds[0] = images.reference[0, 0]
    original = parity.runner

    def runner(path: Path, description: dict):
        run = original(path, description)

        def crossed(pixels: np.ndarray) -> np.ndarray:
            probs = run(pixels)
            first = (pixels == images.pixels[0]).reshape(len(pixels), -1).all(1)
            probs[first, 0] = images.reference[0, 0] - 1e-6
            return probs

        return crossed

    monkeypatch.setattr(parity, "runner", runner)
    report = parity.check_parity(predictor, model, description, images)
    assert not report["passed"] and report["failure"] == "label set agrees on 94.44% of images, not 100%"
    assert all(
        result["label_set_agreement"] == pytest.approx(17 / 18, abs=1e-6) for result in report["batch_sizes"].values()
    )


def test_the_server_answers_each_image_with_its_labels_probabilities_and_thresholds(fitted: dict) -> None:
    model, images = fitted["export"] / "model.onnx", fitted["images"][:12]
    expected = OnnxPredictor(model).classify(images)

    async def scenario(backend) -> tuple[dict, dict]:
        app = create_app(backend, topk=4)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
                files = [("files", (path.name, path.read_bytes(), "application/octet-stream")) for path in images]
                answer = await client.post("/predict", files=files)
                return answer.json(), (await client.get("/info")).json()

    for backend in (load_backend(model), load_backend(fitted["checkpoint"])):
        answer, info = asyncio.run(scenario(backend))
        assert (info["task"], info["thresholds"]) == ("multilabel", expected[0].thresholds), backend.name
        for result, classified in zip(answer["results"], expected, strict=True):
            assert result["status"] == "ok", result
            assert [entry["label"] for entry in result["labels"]] == classified.labels, backend.name
            for entry in result["labels"]:
                assert entry["probability"] == pytest.approx(classified.probabilities[entry["label"]], abs=1e-4)
                assert entry["threshold"] == classified.thresholds[entry["label"]]
            top = {entry["class"]: entry["probability"] for entry in result["top"]}
            assert top == pytest.approx(classified.probabilities, abs=1e-4)
