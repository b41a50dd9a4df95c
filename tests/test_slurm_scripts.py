"""examples/slurm/: the sbatch scripts run, with `srun` standing in for SLURM's, so that they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import REPO, tiny_config

SCRIPTS = REPO / "examples" / "slurm"


def directives(script: Path) -> dict[str, str]:
    """A script's `#SBATCH --name=value` lines (`--name` alone maps to "")."""
    lines = [line.split()[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]
    return dict((line.split("=", 1) + [""])[:2] for line in lines)


def sbatch(script: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run an sbatch script as one task of its job would: `srun` runs its command, the venv is this Python's."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.is_dir():
        bin_dir.mkdir()
        (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done  # its options\nexec "$@"\n')
        (bin_dir / "srun").chmod(0o755)
        (bin_dir / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(tmp_path), "PYTHONPATH": path, **env}
    result = subprocess.run(
        ["bash", str(SCRIPTS / script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_train_script_asks_lightning_for_the_nodes_and_tasks_slurm_gives(small_digits: Path, tmp_path: Path) -> None:
    script = directives(SCRIPTS / "train.sbatch")
    assert script["--signal"] == "SIGUSR1@90" and "--requeue" in script
    assert script["--ntasks-per-node"] == script["--gpus-per-node"]  # one rank per GPU
    slurm = {"SLURM_JOB_NUM_NODES": script["--nodes"], "SLURM_NTASKS_PER_NODE": script["--ntasks-per-node"]}
    config = tiny_config(tmp_path, small_digits)
    printed = yaml.safe_load(sbatch("train.sbatch", tmp_path, "--print_config", CONFIG=str(config), **slurm).stdout)
    # jsonargparse keeps "4" a string, which Lightning reads as 4 devices, as SLURMEnvironment checks
    assert printed["trainer"]["num_nodes"] == 2 and printed["trainer"]["devices"] == "4"
    assert printed["trainer"]["strategy"] == "ddp" and printed["ckpt_path"] == "last"
    assert printed["data"]["data_dir"] == str(small_digits)  # the config's


@pytest.mark.slow
def test_cv_array_tasks_train_their_folds_resume_when_requeued_and_aggregate(few_digits: Path, tmp_path: Path) -> None:
    assert directives(SCRIPTS / "cv.sbatch")["--signal"] == "SIGUSR1@90"
    env = {"CONFIG": str(tiny_config(tmp_path, few_digits)), "RUNS": str(tmp_path / "runs"), "NAME": "digits"}
    array = {"SLURM_ARRAY_TASK_COUNT": "2"}
    for fold in ("0", "1"):
        sbatch("cv.sbatch", tmp_path, "--trainer.max_epochs", "1", SLURM_ARRAY_TASK_ID=fold, **array, **env)
    requeued = sbatch("cv.sbatch", tmp_path, "--trainer.max_epochs", "2", SLURM_ARRAY_TASK_ID="0", **array, **env)

    runs = tmp_path / "runs" / "digits"
    restored = f"Restored all states from the checkpoint at {runs / 'version_0' / 'checkpoints' / 'last.ckpt'}"
    assert restored in requeued.stdout + requeued.stderr
    assert sorted(path.name for path in runs.iterdir()) == ["version_0", "version_1"]
    for fold, epochs in [(0, 2), (1, 1)]:
        last = torch.load(runs / f"version_{fold}" / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["datamodule_hyper_parameters"]["fold"] == fold and last["epoch"] == epochs - 1

    sbatch("cv_aggregate.sbatch", tmp_path, **env)
    summary = json.loads((runs / "cv_0" / "cv_summary.json").read_text())
    assert summary["runs"] == [str(runs / "version_0"), str(runs / "version_1")] and len(summary["folds"]) == 2
    assert (runs / "cv_0" / "oof_predictions.csv").is_file() and (runs / "cv_0" / "ensemble" / "metrics.json").is_file()
