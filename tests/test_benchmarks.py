"""Each benchmark runs end to end, on the least work that still yields every figure, and writes and prints them all.

The figures themselves are measured by running the benchmarks (`make bench`, docs/performance.md), not here. Each
runs in this process, through its `main(argv)`, and so do the `classifier` commands it starts (its test swaps
`classifier_here` in for the benchmark's own way of starting them): a new interpreter costs seconds of imports.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import classifier_here


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One thread, here and in the `classifier` processes the benchmarks start, as in every xdist worker (conftest):
    these runs time nothing, and on a busy 2-core machine two threads a process only thrash (a run takes 3x longer)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_process(*args: str) -> None:
    """A benchmark's `classifier` commands, run in this process: their own processes would import for 5 s each."""
    done = classifier_here(*args)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_throughput_benchmark_writes_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import throughput

    def here(command: list[str], **_: object) -> None:  # its `classifier fit`s in this process: 5 s of imports each
        assert command[:3] == [sys.executable, "-m", "classifier"], command
        done = classifier_here(*command[3:])
        assert done.returncode == 0, done.stderr[-3000:]

    monkeypatch.setattr(throughput, "subprocess", SimpleNamespace(run=here))  # the benchmark's name only
    out = tmp_path / "throughput.json"
    tiny = ["--num-images", "80", "--classes", "4", "--size", "48x40", "--model", "test_resnet", "--image-size", "32"]
    tiny += ["--batch-size", "16", "--workers", "0", "--epochs", "2", "--steps", "2", "--warmup-steps", "1"]
    throughput.main(["--device", "cpu", *tiny, "--data-root", str(tmp_path), "--out", str(out)])
    stdout = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["ceiling_img_s"] > 0 and figures["plain_img_s"] > 0
    assert set(figures["classifier_img_s"]) == {"decode=cpu", "cache=ram"}  # no GPU path without CUDA
    assert all(speed > 0 for speed in figures["classifier_img_s"].values())
    assert "classifier fit, cache=ram" in stdout and "/plain" in stdout

    with pytest.raises(SystemExit) as bad:
        throughput.main(["--device", "cpu", *tiny, "--paths", "decode=tpu"])
    assert bad.value.code == 2 and "--paths: unknown decode=tpu" in capsys.readouterr().err


@pytest.mark.slow
def test_train_resolution_benchmark_shows_the_drafts_against_the_full_decode(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from benchmarks import train_resolution

    out = tmp_path / "resolution.json"
    tiny = ["--num-images", "2", "--size", "800x600", "--model", "test_resnet", "--image-size", "32", "--repeats", "1"]
    train_resolution.main([*tiny, "--crops", "32", "--data-root", str(tmp_path), "--out", str(out)])
    stdout = capsys.readouterr().out
    figures = json.loads(out.read_text())
    # 800x600 drafts to 100x75 for eval's 33 px, where an 8% crop is about 20 px; a 131-px draft keeps 32 px
    assert (figures["draft=scale_size"]["min_size"], figures["draft=train"]["min_size"]) == (33, 131)
    assert figures["full"]["psnr_db"] == float("inf") and figures["full"]["upsampled"] == 0.0
    assert figures["draft=scale_size"]["upsampled"] > 0.0 and figures["draft=train"]["upsampled"] == 0.0
    assert figures["draft=train"]["psnr_db"] > figures["draft=scale_size"]["psnr_db"]
    assert "draft=train" in stdout and "/full" in stdout


@pytest.mark.slow
def test_bundled_digits_benchmark_scores_the_run_and_the_svm_on_one_split(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import bundled_digits

    monkeypatch.setattr(bundled_digits, "classifier", in_process)
    out = tmp_path / "digits.json"
    # one TTA: each is a `classifier test` run of its own; the test checks the last one
    tiny = ["--seeds", "3", "--tta", "flip", "--quick", "--max-epochs", "1"]
    bundled_digits.main([*tiny, "--runs", str(tmp_path / "runs"), "--out", str(out)])
    stdout = capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    tests = sorted((tmp_path / "runs").rglob("metrics.json"), key=lambda path: path.stat().st_mtime)
    assert [json.loads(path.read_text())["test/acc"] for path in tests[-1:]] == [row["acc_flip"]]
    assert row["seed"] == 3 and row["fit_s"] > 0 and 0.95 < row["svm_acc"] <= 1  # RBF SVM on raw 8x8 pixels
    assert "min–max" in stdout and "acc_flip" in stdout and "svm_acc" in stdout


@pytest.mark.slow
def test_lr_find_benchmark_trains_each_rules_rate_beside_the_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import bundled_digits, lr_find

    monkeypatch.setattr(bundled_digits, "classifier", in_process)
    monkeypatch.setattr(lr_find, "classifier", in_process)
    out = tmp_path / "lr_find.json"
    lr_find.main(["--seeds", "3", "--quick", "--rules", "minimum", "--runs", str(tmp_path / "runs"), "--out", str(out)])
    config, minimum = json.loads(out.read_text())
    (points,) = (tmp_path / "runs" / "sweep").rglob("lr_find.csv")
    lrs, losses = np.loadtxt(points, delimiter=",", skiprows=1, unpack=True)
    assert minimum["lr"] == pytest.approx(lrs[10 + np.argmin(losses[10:])] / 10)  # the rule, on the sweep's points
    for row in (config, minimum):
        (run,) = (tmp_path / "runs" / row["rate"] / "seed_3").glob("*/version_*")
        assert [json.loads((run / "test" / "metrics.json").read_text())["test/acc"]] == row["accuracies"]
    trained = yaml.safe_load((run / "config.yaml").read_text())["model"]["optimizer"]["init_args"]["lr"]
    assert trained == pytest.approx(minimum["lr"], rel=1e-2)  # fitted at the suggestion (printed to 3 digits)
    assert "points from the config's" in capsys.readouterr().out


@pytest.mark.slow
def test_speedrun_benchmark_times_the_recipe_against_the_reference_on_one_split(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import bundled_digits, speedrun

    monkeypatch.setattr(bundled_digits, "classifier", in_process)  # speedrun fits and tests through `measure`
    out = tmp_path / "speedrun.json"
    speedrun.main(["--seeds", "3", "--quick", "--runs", str(tmp_path / "runs"), "--out", str(out)])
    stdout = capsys.readouterr().out
    figures = json.loads(out.read_text())
    (row,) = figures["rows"]
    for name, config in (("speedrun", "speedrun_digits"), ("reference", "resnet18")):
        (run,) = (tmp_path / "runs" / name / "seed_3").glob("*/version_*")
        assert run.parent.name == config  # each config's own logger name: the two runs do not share a folder
        assert json.loads((run / "test" / "metrics.json").read_text())["test/acc"] == row[f"{name}_acc"]
    assert row["seed"] == 3 and row["test_images"] == 270 and 0.95 < row["svm_acc"] <= 1
    assert row["time_ratio"] == pytest.approx(row["speedrun_fit_s"] / row["reference_fit_s"])
    assert figures["mean"]["speedrun_acc"] == row["speedrun_acc"]
    assert "time_ratio" in stdout and "mean |" in stdout and "test errors over all seeds: speedrun" in stdout


@pytest.mark.slow
def test_inference_benchmark_times_every_runtime_against_eager(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks import inference

    out = tmp_path / "inference.json"
    # batch 1: one input shape, so torch.compile compiles once (a second shape recompiles, about as long again)
    try:
        inference.main(["--models", "test_resnet", "--quick", "--image-size", "32", "--batch", "1", "--out", str(out)])
    finally:
        torch._dynamo.reset()  # the compiled graph and the shapes dynamo saw leave with this test
    stdout = capsys.readouterr().out
    figures = json.loads(out.read_text())["test_resnet"]
    runtimes = figures["runtimes"]
    assert list(runtimes) == ["eager", "compile", "ort_fp32", "ort_int8", "torch_free_e2e"]
    assert runtimes["eager"]["p50_vs_eager"] == 1.0 and runtimes["eager"]["img_s_vs_eager"] == 1.0
    for name, f in runtimes.items():
        assert 0 < f["p50_ms"] <= f["p95_ms"] and f["img_s"] > 0, name
        assert f["img_s_vs_eager"] == pytest.approx(f["img_s"] / runtimes["eager"]["img_s"]), name
    summary = figures["summary"]
    assert summary["int8_img_s_vs_fp32"] == pytest.approx(runtimes["ort_int8"]["img_s"] / runtimes["ort_fp32"]["img_s"])
    assert 0 < summary["e2e_share_outside_model"] < 1
    assert "torch_free_e2e" in stdout and "/eager" in stdout


@pytest.mark.slow
def test_check_data_benchmark_finds_the_planted_copies_and_times_both_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from benchmarks import check_data
    from classifier.data.file_facts import CACHE_ENV

    for name in (CACHE_ENV, check_data.TIMES_FILE):  # the benchmark points both at its own files; put back after
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "check_data.json"
    # a third of --quick's originals: 2 copies of each kind are still planted
    check_data.main(["--quick", "--images", "200", "--out", str(out)])
    stdout = capsys.readouterr().out
    f = json.loads(out.read_text())
    assert f["images"] == 200 + 4 * 2  # 1% of the originals planted per kind
    for kind in ("exact", "recompressed", "resized"):
        assert f[f"recall_{kind}"] == 1.0, kind
    assert f["precision"] == 1.0 and f["reported_pairs"] >= 3 * 2
    assert f["first_audit_vs_plain"] == pytest.approx(f["first_audit_s"] / f["plain_decode_s"])
    assert f["second_audit_vs_first"] == pytest.approx(f["second_audit_s"] / f["first_audit_s"])
    assert f["second_fit_data_setup_vs_first"] == pytest.approx(
        f["second_fit_data_setup_s"] / f["first_fit_data_setup_s"]
    )
    # the times are figures to print, not claims: their order depends on the machine's load
    assert f["second_fit_data_setup_s"] > 0 and f["first_fit_data_setup_s"] > 0 and f["first_fit_first_step_s"] > 0
    assert "second_audit_vs_first" in stdout


@pytest.mark.slow
def test_multilabel_benchmark_compares_the_tuned_thresholds_with_half(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import multilabel

    monkeypatch.setattr(multilabel, "classifier", in_process)
    measured = []
    original = multilabel.test_metrics
    monkeypatch.setattr(multilabel, "test_metrics", lambda *args: measured.append(original(*args)) or measured[-1])
    monkeypatch.setattr(multilabel, "RUNS", (("tiny", 40, 1),))
    multilabel.main(["--seed", "2"])
    stdout = capsys.readouterr().out
    at_half, tuned = measured  # test at 0.5 first, then at the checkpoint's thresholds
    assert tuned["test/map"] == at_half["test/map"]  # threshold-free
    (line,) = [line.split() for line in stdout.splitlines() if line.strip().startswith("f1_macro")]
    expected = [f"{tuned['test/f1_macro']:.4f}", f"{at_half['test/f1_macro']:.4f}"]
    assert line[1:3] == expected
    beats = tuned["test/f1_macro"] > at_half["test/f1_macro"]
    assert f"tuned thresholds beat 0.5 on test macro F1: {'yes' if beats else 'NO'}" in stdout


def test_near_copies_benchmark_finds_every_kind_but_the_limits_and_no_distinct_pair(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    from benchmarks import near_copies

    out = tmp_path / "near.json"
    near_copies.main(["--digits", "40", "--out", str(out)])
    figures = json.loads(out.read_text())
    kinds = figures["kinds"]
    limits = {name for name in kinds if name.endswith("(limit)")}
    assert len(kinds) == 11 and len(limits) == 2
    assert {name: kinds[name]["found"] for name in kinds if name not in limits} == dict.fromkeys(
        set(kinds) - limits, 1.0
    )
    assert all(kind["other_digit_pairs"] == 0 for kind in kinds.values())
    assert kinds["36 px cropped 5% a side, q85"]["found_before"] == 0.0  # what the crop hashes and alignment add
    stdout = capsys.readouterr().out
    assert "36 px cropped 5% a side" in stdout and figures["hashes_ms"] > 0


def test_resize_modes_benchmark_puts_half_the_digits_mostly_where_a_centre_crop_cannot_see(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from benchmarks import resize_modes
    from tests.helpers import REPO, digit_subset

    digits = digit_subset(REPO / "data" / "digits", tmp_path / "digits", 15)
    strips = resize_modes.write_strips(digits, tmp_path / "strips", seed=0)
    outside = []
    for path in sorted(digits.rglob("*.png")):
        strip = np.asarray(Image.open(strips / path.parent.name / path.name))
        assert strip.shape == (24, 72)
        scan = np.asarray(Image.open(path).convert("L").resize((24, 24), Image.Resampling.NEAREST))
        left = next(x for x in range(49) if (strip[:, x : x + 24] == np.maximum(strip[:, x : x + 24], scan)).all())
        outside.append(not 24 <= left + 12 < 48)  # its centre outside the middle third, all a square crop keeps
    assert np.mean(outside) == pytest.approx(1 / 2, abs=0.1)


@pytest.mark.slow
def test_ood_benchmark_prints_energy_beside_msp(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import ood

    monkeypatch.setattr(ood, "classifier", in_process)
    monkeypatch.setattr(ood, "PHOTOS_PER_CLASS", 3)
    tiny = ("--model.backbone", "test_resnet", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2")
    monkeypatch.setattr(ood, "RECIPE", (*ood.RECIPE, *tiny))
    out = tmp_path / "ood.json"
    ood.main(["--seeds", "3", "--out", str(out)])
    stdout = capsys.readouterr().out
    (found,) = json.loads(out.read_text())["runs"]
    energy, msp = found["scores"]["energy"], found["scores"]["msp"]
    assert found["seed"] == 3 and energy["ood/images_test"] == msp["ood/images_test"] == 270
    assert energy["ood/images_ood"] == msp["ood/images_ood"] == 9
    assert energy["ood/threshold"] != msp["ood/threshold"]  # each calibrated on its own score
    for name, key, _, _ in ood.ROWS:
        (line,) = [line.split() for line in stdout.splitlines() if line.strip().startswith(name)]
        ratio = f"{energy[key] / msp[key]:.3f}" if msp[key] else "-"
        assert line[len(name.split()) :][:3] == [f"{energy[key]:.4f}", f"{msp[key]:.4f}", ratio]

    worse = json.loads(json.dumps(found))  # a second seed, as --seeds would give, whose energy AUROC is 0.5
    worse["scores"]["energy"]["ood/auroc"] = 0.5
    ood.show_range([found, worse])
    (ranged,) = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("OOD AUROC")]
    low, high = sorted([0.5, energy["ood/auroc"]])
    met = sum(value >= ood.TARGET_AUROC for value in (0.5, energy["ood/auroc"]))
    assert ranged[2:] == [
        f"{low:.4f}-{high:.4f}",
        f"{msp['ood/auroc']:.4f}-{msp['ood/auroc']:.4f}",
        f"{met},",
        str(2 * (msp["ood/auroc"] >= ood.TARGET_AUROC)),
    ]


@pytest.mark.slow
def test_shards_benchmark_sets_each_data_path_and_size_beside_the_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import shards

    monkeypatch.setattr(shards, "classifier", in_process)
    out = tmp_path / "shards.json"
    shards.main(["--quick", "--out", str(out)])
    stdout = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert set(figures["datasets"]) == {"digits", "photos"}
    for name, found in figures["datasets"].items():
        assert set(found["img_s"]) == set(shards.PATHS), name
        assert all(speed > 0 for speed in found["img_s"].values()), name
        for path, speed in found["img_s"].items():
            assert found["img_s_vs_folder"][path] == pytest.approx(speed / found["img_s"]["folder"]), (name, path)
            (line,) = [line.split() for line in stdout.splitlines() if line.split()[:2] == [name, path]]
            assert line[2:] == [f"{speed:.0f}", f"{found['img_s_vs_folder'][path]:.2f}"], (name, path)
        folder, sharded = found["folder"], found["shards"]
        assert folder["files"] == found["images"] and sharded["files"] >= 7  # 3 splits' chunks and index, the metadata
        assert 0 < folder["bytes"] <= folder["allocated"] and 0 < sharded["bytes"] <= sharded["allocated"]
        assert found["bytes_vs_folder"] == pytest.approx(sharded["bytes"] / folder["bytes"]), name
        assert found["allocated_vs_folder"] == pytest.approx(sharded["allocated"] / folder["allocated"]), name
    assert figures["datasets"]["digits"]["images"] == 10 * 20 and figures["datasets"]["photos"]["images"] == 3 * 8
    # 200 files of about 120 bytes take a block each; the shards' few files hold them all in far fewer blocks
    assert figures["datasets"]["digits"]["allocated_vs_folder"] < 0.5
    (row,) = figures["accuracy"]
    assert row["seed"] == 42 and row["folder_fit_img_s"] > 0 and row["shards_fit_img_s"] > 0
    for source in ("folder", "shards"):
        assert 0 <= row[f"{source}_test_acc"] <= 1
    (line,) = [line.split() for line in stdout.splitlines() if line.split()[:1] == ["42"]]
    assert line[1:3] == [f"{row['folder_test_acc']:.4f}", f"{row['shards_test_acc']:.4f}"]
