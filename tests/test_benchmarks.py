"""The throughput benchmark runs end to end and writes the figures the README quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_throughput_benchmark_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    tiny = ["--num-images", "80", "--classes", "4", "--size", "48x40", "--model", "test_resnet", "--image-size", "32"]
    tiny += ["--batch-size", "16", "--workers", "0", "--epochs", "2", "--steps", "2", "--warmup-steps", "1"]
    command = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", "cpu", *tiny]
    result = subprocess.run(
        [*command, "--data-root", str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["ceiling_img_s"] > 0 and figures["plain_img_s"] > 0
    assert set(figures["classifier_img_s"]) == {"decode=cpu", "cache=ram"}  # no GPU path without CUDA
    assert all(speed > 0 for speed in figures["classifier_img_s"].values())
    assert "classifier fit, cache=ram" in result.stdout and "/plain" in result.stdout

    bad = subprocess.run([*command, "--paths", "decode=tpu"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--paths: unknown decode=tpu" in bad.stderr


@pytest.mark.slow
def test_train_resolution_benchmark_shows_the_drafts_against_the_full_decode(tmp_path: Path) -> None:
    out = tmp_path / "resolution.json"
    tiny = ["--num-images", "2", "--size", "800x600", "--model", "test_resnet", "--image-size", "32", "--repeats", "1"]
    command = [sys.executable, str(REPO / "benchmarks" / "train_resolution.py"), *tiny, "--crops", "32"]
    result = subprocess.run(
        [*command, "--data-root", str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    # 800x600 drafts to 100x75 for eval's 33 px, where an 8% crop is about 20 px; a 131-px draft keeps 32 px
    assert (figures["draft=scale_size"]["min_size"], figures["draft=train"]["min_size"]) == (33, 131)
    assert figures["full"]["psnr_db"] == float("inf") and figures["full"]["upsampled"] == 0.0
    assert figures["draft=scale_size"]["upsampled"] > 0.0 and figures["draft=train"]["upsampled"] == 0.0
    assert figures["draft=train"]["psnr_db"] > figures["draft=scale_size"]["psnr_db"]
    assert "draft=train" in result.stdout and "/full" in result.stdout


@pytest.mark.slow
def test_bundled_digits_benchmark_scores_the_run_and_the_svm_on_one_split(tmp_path: Path) -> None:
    out = tmp_path / "digits.json"
    command = [sys.executable, str(REPO / "benchmarks" / "bundled_digits.py"), "--seeds", "3", "--tta", "none", "flip"]
    result = subprocess.run(
        [*command, "--max-epochs", "1", "--runs", str(tmp_path / "runs"), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    tests = sorted((tmp_path / "runs").rglob("metrics.json"), key=lambda path: path.stat().st_mtime)
    assert [json.loads(path.read_text())["test/acc"] for path in tests[-1:]] == [row["acc_flip"]]
    assert row["seed"] == 3 and row["fit_s"] > 0 and 0.95 < row["svm_acc"] <= 1  # RBF SVM on raw 8x8 pixels
    assert "min–max" in result.stdout and "svm_acc" in result.stdout


@pytest.mark.slow
def test_inference_benchmark_times_every_runtime_against_eager(tmp_path: Path) -> None:
    out = tmp_path / "inference.json"
    command = [sys.executable, "-m", "benchmarks.inference", "--models", "test_resnet", "--quick"]  # as the README
    result = subprocess.run([*command, "--image-size", "32", "--batch", "8", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
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
    assert "torch_free_e2e" in result.stdout and "/eager" in result.stdout


@pytest.mark.slow
def test_check_data_benchmark_finds_the_planted_copies_and_times_both_runs(tmp_path: Path) -> None:
    out = tmp_path / "check_data.json"
    command = [sys.executable, "-m", "benchmarks.check_data", "--quick", "--out", str(out)]  # as the README
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    f = json.loads(out.read_text())
    assert f["images"] == 600 + 4 * 6  # 1% of the originals planted per kind
    for kind in ("exact", "recompressed", "resized"):
        assert f[f"recall_{kind}"] == 1.0, kind
    assert f["precision"] == 1.0 and f["reported_pairs"] >= 18
    assert f["first_audit_vs_plain"] == pytest.approx(f["first_audit_s"] / f["plain_decode_s"])
    assert f["second_audit_vs_first"] == pytest.approx(f["second_audit_s"] / f["first_audit_s"])
    assert f["second_fit_data_setup_vs_first"] == pytest.approx(
        f["second_fit_data_setup_s"] / f["first_fit_data_setup_s"]
    )
    assert 0 < f["second_fit_data_setup_s"] < f["first_fit_data_setup_s"] < f["first_fit_first_step_s"]
    assert "second_audit_vs_first" in result.stdout
