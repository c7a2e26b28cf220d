"""The report layer loads without the compute stack: rendering records needs no torch."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["bench.leaderboard", "bench.store", "bench.records", "bench.pooling", "bench.atomic",
                                    "bench.failures", "bench.config"])
def test_the_report_and_record_modules_import_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("module", ["bench.leaderboard", "bench.ranking", "bench.metrics", "bench.scaling_report"])
def test_rendering_does_not_load_scipy_stats(module):
    """scipy.stats alone costs 0.7 s of import; the report takes its t quantiles from scipy.special."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'scipy.stats'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
