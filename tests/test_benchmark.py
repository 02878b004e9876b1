"""`padim-hf benchmark`: fit and evaluate every category of a root, tables, models, resume, push."""

import csv
import json

import pytest

import padim_hf.benchmark as benchmark
from padim_hf import PadimModel
from padim_hf.cli import main as cli
from padim_hf.demo import make_demo_dataset

from .test_hub import hub, hub_env  # noqa: F401  (the loopback Hub fixtures)

OVERRIDES = {"image_size": 64, "n_features": 16}



def test_benchmark_on_two_categories_writes_the_table_and_models_pushes_and_resumes(tmp_path, hub_env, monkeypatch, capsys):
    root = tmp_path / "root"
    for seed, category in enumerate(["tiles", "weave"]):
        make_demo_dataset(root / category, n_train=5, n_test_good=3, n_test_defect=2, size=64, seed=seed)
    (root / "notes").mkdir()  # not a category: ignored
    out = tmp_path / "out"
    result = benchmark.run_benchmark(
        root, "padim-lite0-offline", out, overrides=OVERRIDES, calibration_fraction=0.4, cpu=True,
        push_to_hub="acme", progress=False,
    )
    assert [row["category"] for row in result.rows] == ["tiles", "weave"]
    for row in result.rows:
        assert 0 <= row["pixel_aupro"] <= 1 and 0 <= row["pixel_auroc"] <= 1 and row["fit_seconds"] > 0
        assert row["num_test_images"] + row["num_calibration_images"] == 7 and row["num_calibration_images"] == 3
        model = PadimModel.from_pretrained(out / row["category"] / "model")
        assert model.config.metrics["pixel_aupro"] == pytest.approx(row["pixel_aupro"], abs=1e-6)
        assert model.config.calibration["fraction"] == 0.4
        assert row["repo_id"] == f"acme/padim-lite0-offline-{row['category']}"
        assert row["repo_id"] in hub_env.state.repos
    assert result.mean["pixel_auroc"] == pytest.approx(sum(r["pixel_auroc"] for r in result.rows) / 2)
    table = (out / "results.md").read_text()
    assert "| Category | Image AUROC | Pixel AUROC | AUPRO | Image F1-max | Pixel F1-max | Fit (s) | Eval (images/s) |" in table
    assert f"| tiles | {100 * result.rows[0]['image_auroc']:.1f} | {100 * result.rows[0]['pixel_auroc']:.1f} |" in table
    assert "| **mean** |" in table
    with open(out / "results.csv") as handle:
        assert [row["category"] for row in csv.DictReader(handle)] == ["tiles", "weave", "mean"]
    assert json.loads((out / "results.json").read_text())["mean"] == pytest.approx(result.mean)

    # Resume: finished categories are read back, neither fitted nor pushed again.
    commits = {repo: len(hub_env.state.repos[repo].history) for repo in ("acme/padim-lite0-offline-tiles", "acme/padim-lite0-offline-weave")}
    monkeypatch.setattr(benchmark, "fit_padim", lambda *a, **k: pytest.fail("a finished category was fitted again"))
    capsys.readouterr()
    cli(["benchmark", "--data", str(root), "--output-dir", str(out), "--image-size", "64", "--n-features", "16",
         "--calibration-fraction", "0.4", "--cpu", "--push-to-hub", "acme"])
    assert "| **mean** |" in capsys.readouterr().out
    assert {repo: len(hub_env.state.repos[repo].history) for repo in commits} == commits
    with pytest.raises(ValueError, match="was run with preset"):  # another setting never mixes into the table
        benchmark.run_benchmark(root, "padim-lite0-offline", out, overrides={"image_size": 96}, cpu=True, progress=False)
