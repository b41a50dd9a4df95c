"""Importing the package leaves the user's session as it was."""

from __future__ import annotations

import subprocess
import sys


def test_importing_classifier_keeps_the_matplotlib_backend() -> None:
    code = (
        "import matplotlib; matplotlib.use('svg'); import classifier, classifier.reports, classifier.tuning; "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
