"""`classifier push`: a tested checkpoint as a Hugging Face model repo that timm loads as is, with a model card whose
numbers are the run's own; fine-tuning and predicting from such a repo; and the upload, as far as no network allows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

from classifier.deploy.predictor import Predictor
from classifier.model.net import ClassifierNet
from classifier.model.repos import OURS
from tests.conftest import built_once
from tests.helpers import classifier_here, own_run, run_dir, tiny_config


@pytest.fixture(scope="session")
def pushed(unknown_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The calibrated digits model, tested and pushed to a folder (`repo/`)."""

    def build(folder: Path) -> None:
        run = own_run(run_dir(unknown_run, 0), folder)
        checkpoint = run / "checkpoints" / "best-calibrated.ckpt"
        for command in (["test"], ["push", "--output", str(folder / "repo"), "--license", "mit"]):
            done = classifier_here(*command, "--ckpt_path", str(checkpoint))
            assert done.returncode == 0, done.stderr[-3000:]

    return built_once(tmp_path_factory, "pushed", build)


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.slow
def test_timm_loads_the_pushed_repo_with_the_checkpoints_classes_and_logits(pushed: Path, digits_dir: Path) -> None:
    repo, run = pushed / "repo", pushed / "version_0"
    checkpoint = run / "checkpoints" / "best-calibrated.ckpt"
    source = Predictor.from_checkpoint(checkpoint, tta="none")

    model = timm.create_model(f"local-dir:{repo}", pretrained=True).eval()

    assert model.pretrained_cfg["label_names"] == source.class_names == [str(d) for d in range(10)]
    assert json.loads((repo / "config.json").read_text())["label_names"] == source.class_names
    images = torch.stack([source.preprocess(next((digits_dir / d).iterdir())) for d in "0123456789"])
    normalised = (images.float() - source.mean) / source.std
    with torch.no_grad():
        theirs, ours = model(normalised), source.net(normalised)
    assert source.net.temperature != 1.0  # calibrated: timm's logits are the checkpoint's before its temperature
    torch.testing.assert_close(theirs / source.net.temperature, ours, atol=1e-4, rtol=0)
    config = timm.data.resolve_data_config(model=model)  # timm's own preprocessing is the checkpoint's
    for key in ("input_size", "interpolation", "crop_pct", "crop_mode"):
        assert (
            tuple(config[key]) == tuple(source.preprocessing[key])
            if key == "input_size"
            else config[key] == source.preprocessing[key]
        )
    assert list(config["mean"]) == pytest.approx(source.preprocessing["mean"])

    back = Predictor.from_pretrained(str(repo))  # classifier's way back: temperature and rejection included
    assert back.net.rejection == source.net.rejection and back.net.temperature == source.net.temperature
    for path in sorted((digits_dir / "7").iterdir())[:3]:
        assert back.classify(path) == source.classify(path)


@pytest.mark.slow
def test_the_model_card_reads_its_numbers_from_the_runs_files(pushed: Path) -> None:
    repo, run = pushed / "repo", pushed / "version_0"
    card = (repo / "README.md").read_text()
    meta = front_matter(card)
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    calibration = json.loads((run / "checkpoints" / "best-calibrated.json").read_text())

    assert (meta["library_name"], meta["license"], meta["pipeline_tag"]) == ("timm", "mit", "image-classification")
    shown = {entry["name"]: entry["value"] for entry in meta["model-index"][0]["results"][0]["metrics"]}
    assert shown["Test accuracy"] == round(metrics["test/acc"], 4)
    assert shown["Test macro F1"] == round(metrics["test/f1_macro"], 4)
    for key, value in metrics.items():
        assert f"| {key} | {value:.4f} |" in card
    assert f"{calibration['test']['before']['ece']:.4f} before and {calibration['test']['after']['ece']:.4f}" in card
    table = (run / "splits.csv").read_bytes()
    assert hashlib.blake2b(table, digest_size=8).hexdigest() in card
    test_rows = sum(line.split(",")[2] == "test" for line in table.decode().splitlines()[1:])
    assert f"{test_rows} test" in card and "![confusion matrix](confusion_matrix.png)" in card
    assert (repo / "confusion_matrix.png").read_bytes() == (run / "test" / "confusion_matrix.png").read_bytes()


@pytest.mark.slow
def test_fine_tuning_from_the_pushed_repo_starts_at_its_level(pushed: Path, digits_dir: Path, tmp_path: Path) -> None:
    level = json.loads((pushed / "version_0" / "summary.json").read_text())["best_value"]  # val macro F1
    assert level > 0.6  # far above what one epoch at a learning rate of 1e-5 reaches from scratch (0.1: chance)
    config = tiny_config(tmp_path, digits_dir, trainer={"max_epochs": 1}, data={"batch_size": 64})

    done = classifier_here(
        "fit", "--config", str(config), "--model.pretrained", str(pushed / "repo"), "--model.optimizer.lr", "1e-5"
    )
    assert done.returncode == 0, done.stderr[-3000:]

    first = json.loads((run_dir(tmp_path, 0) / "summary.json").read_text())
    assert first["best_epoch"] == 0 and first["best_value"] == pytest.approx(level, abs=0.03)


def test_a_repo_of_other_classes_gives_its_backbone_and_a_fresh_head(pushed: Path) -> None:
    repo = pushed / "repo"
    ours = json.loads((repo / "config.json").read_text())[OURS]
    pushed_net = ClassifierNet.from_repo(str(repo))
    for classes, head_kept in ((ours["class_names"], True), (list("9876543210"), False)):
        net = ClassifierNet(ours["backbone"], classes, image_size=ours["image_size"])
        net.load_pretrained(f"local-dir:{repo}")
        mine, theirs = net.backbone.state_dict(), pushed_net.backbone.state_dict()
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs if not key.startswith("fc."))
        assert torch.equal(mine["fc.weight"], theirs["fc.weight"]) == head_kept  # reordered classes: a new head


def test_push_and_pretrained_repos_refuse_what_they_cannot_use_before_any_work(
    trained_checkpoint: Path, pushed: Path, small_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "repo"
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    offline = classifier_here("push", "--ckpt_path", str(trained_checkpoint), "--output", str(output),
                              "--repo_id", "me/digits")  # fmt: skip
    assert offline.returncode != 0 and "--repo_id me/digits" in offline.stderr
    assert len([line for line in offline.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not output.exists()  # failed before doing any work

    untested = own_run(trained_checkpoint.parent.parent, tmp_path) / "checkpoints" / "last.ckpt"
    failed = classifier_here("push", "--ckpt_path", str(untested), "--output", str(output))
    assert failed.returncode != 0 and "classifier test --ckpt_path" in failed.stderr and not output.exists()

    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1})
    for source, words in (
        (f"local-dir:{tmp_path / 'none'}", ["config.json", "does not exist"]),
        (f"local-dir:{pushed / 'repo'}", ["holds a test_resnet", "--model.backbone is resnet18"]),
    ):
        wrong = classifier_here("fit", "--config", str(config), "--model.backbone", "resnet18",
                                "--model.pretrained", source)  # fmt: skip
        assert wrong.returncode != 0 and all(word in wrong.stderr for word in words), wrong.stderr


def test_the_upload_makes_a_private_repo_of_the_folder_unless_public(
    trained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    class FakeHub:  # huggingface_hub.HfApi as far as push uses it: no network here
        def whoami(self) -> dict:
            return {"name": "me"}

        def create_repo(self, repo_id: str, **options) -> str:
            calls.append(("create", repo_id, options))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **options) -> None:
            calls.append(("upload", sorted(p.name for p in Path(options["folder_path"]).iterdir()), options["repo_id"]))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeHub)
    for flags, private in ((["--with_onnx"], True), (["--public"], False)):
        calls.clear()
        output = tmp_path / f"repo{private}"
        done = classifier_here("push", "--ckpt_path", str(trained_checkpoint), "--output", str(output),
                               "--repo_id", "me/digits", *flags)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert calls[0] == ("create", "me/digits", {"repo_type": "model", "private": private, "exist_ok": True})
        files = ["README.md", "config.json", "confusion_matrix.png", "model.safetensors"]
        if "--with_onnx" in flags:  # classifier export's files, its parity check passed
            files = sorted([*files, "model.onnx", "parity.json", "preprocess.json"])
            assert json.loads((output / "parity.json").read_text())["passed"]
        assert calls[1] == ("upload", files, "me/digits")
        assert "hf-hub:me/digits" in (output / "README.md").read_text()
