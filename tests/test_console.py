"""What the `classifier` command prints: errors first and on one line, and no third-party noise."""

from __future__ import annotations

from pathlib import Path

import pytest

from classifier.cli.entry import main
from tests.helpers import tiny_config


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """The command's exit status and the lines it wrote to stderr."""
    with pytest.raises(SystemExit) as stopped:
        main(args)
    return stopped.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_stops_with_one_line(
    subcommand: str, small_digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tiny_config(tmp_path, small_digits)
    status, lines = run_main([subcommand, "--config", str(config), "--data.predict_dir", str(small_digits)], capsys)
    assert status == 2
    assert lines == [
        f"error: classifier {subcommand} needs --ckpt_path FILE, the checkpoint to evaluate (such as "
        "lightning_logs/<name>/version_N/checkpoints/best.ckpt): a model that was never trained only guesses",
        f"`classifier {subcommand} --help` lists every option.",
    ]
    assert not (tmp_path / "lightning_logs").exists()  # nothing was evaluated, no report written


def test_a_misspelt_option_is_named_first_with_the_closest_options(
    small_digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tiny_config(tmp_path, small_digits)
    status, lines = run_main(["fit", "--config", str(config), "--trainer.max_epohcs", "3"], capsys)
    assert status == 2
    assert lines == [
        "error: unrecognized arguments: --trainer.max_epohcs 3 (--trainer.max_epohcs: did you mean "
        "--trainer.max_epochs or --trainer.max_steps or --trainer.min_epochs?)",
        "`classifier fit --help` lists every option.",
    ]


def test_a_missing_data_dir_is_one_line_and_verbose_gives_the_traceback(
    small_digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tiny_config(tmp_path, small_digits)
    missing = tmp_path / "my_photos"
    status, lines = run_main(["fit", "--config", str(config), "--data.data_dir", str(missing)], capsys)
    assert status == 2
    assert lines[-2:] == [
        f"error: --data.data_dir {missing} does not exist: point it at a folder of class subfolders",
        "(--debug or CLASSIFIER_DEBUG=1 shows the traceback)",
    ]
    status, lines = run_main(["fit", "--config", str(config), "--data.data_dir", str(missing), "--verbose"], capsys)
    assert status == 2
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == f"FileNotFoundError: --data.data_dir {missing} does not exist: point it at a folder of class " \
        "subfolders"  # fmt: skip
