"""The side-by-side benchmark script runs end to end in a tiny padim_hf-only configuration (no anomalib needed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_padim.py"


@pytest.mark.slow
def test_benchmark_script_runs_and_reports(tmp_path):
    command = [
        sys.executable, str(SCRIPT), "--configs", "r18", "--n-images", "4", "--image-size", "64", "--batch-size", "2",
        "--predict-images", "2", "--latency-repeats", "1", "--repeats", "1", "--no-anomalib", "--no-hazelnut",
        "--json", str(tmp_path / "bench.json"), "--markdown", str(tmp_path / "bench.md"),
    ]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    (row,) = report["summary"]
    assert row["config"] == "r18" and row["n_images"] == 4
    for key in ("backbone_seconds", "padim_hf.fit_seconds", "padim_hf.fit_peak_rss_bytes", "padim_hf.checkpoint_bytes",
                "padim_hf.gaussian_bytes", "padim_hf.predict_images_per_second", "padim_hf.latency_b1_seconds"):
        assert row[key] > 0, key
    assert row["padim_hf.gaussian_bytes"] < row["padim_hf.checkpoint_bytes"]
    markdown = (tmp_path / "bench.md").read_text()
    assert "| r18 | 4 | padim_hf |" in markdown and "backbone only" in markdown
