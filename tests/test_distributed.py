"""Multi-process fits with REAL processes (torchrun, gloo on CPU) equal the one-process fit.

Each launch runs several jobs in the same processes (tests/distributed_fit_worker.py) to pay torch's start-up once.
Every process reports the rank, world size and distributed type it got, and how many images it fitted: the tests
assert them, so a launcher that silently starts one process (or processes that do not cooperate) fails here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value

from padim_hf import PadimModel
from padim_hf.demo import make_demo_dataset
from padim_hf.fit import build_model, fit_padim, make_accelerator, save_fitted, training_split
from padim_hf.gaussian import unpack_lower

WORKER = Path(__file__).with_name("distributed_fit_worker.py")
CONFIG = {"backbone": "tf_efficientnet_lite0", "layers": [1, 2, 3], "n_features": 16, "image_size": 48,
          "covariance_storage": "float32"}
PROBE = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory, lite0_weights) -> dict:
    """5 training images as an MVTec folder and as a Hub repository with 3 parquet shards (2 + 2 + 1 images),
    and the one-process models every multi-process fit must equal."""
    root = tmp_path_factory.mktemp("distributed")
    folder = make_demo_dataset(root / "folder", n_train=5, n_test_good=0, n_test_defect=0, size=48)
    images = sorted((folder / "train" / "good").glob("*.png"))
    (root / "repo" / "data").mkdir(parents=True)
    features = Features({"image": Image(), "label": Value("int64")})
    for index, part in enumerate([images[0:2], images[2:4], images[4:5]]):
        rows = {"image": [{"bytes": p.read_bytes(), "path": None} for p in part], "label": [0] * len(part)}
        Dataset.from_dict(rows, features=features).to_parquet(root / "repo" / "data" / f"train-0000{index}-of-00003.parquet")
    # A streamed split whose first shard holds only an anomalous image: filtered out, the main process gets none.
    (root / "anomalous_first" / "data").mkdir(parents=True)
    for index, (part, label) in enumerate([(images[4:5], 1), (images[0:1], 0), (images[1:2], 0)]):
        rows = {"image": [{"bytes": p.read_bytes(), "path": None} for p in part], "label": [label] * len(part)}
        Dataset.from_dict(rows, features=features).to_parquet(root / "anomalous_first" / "data" / f"train-0000{index}-of-00003.parquet")
    references = {}
    for name, source in {"five": images, "two": images[:2]}.items():
        model = fit_padim(build_model(CONFIG, backbone_weights=lite0_weights), source, accelerator=make_accelerator(cpu=True), progress=False)
        references[name] = save_fitted(model, root / f"reference-{name}")
    return dict(root=root, folder=folder, images=images, repo=root / "repo", anomalous_first=root / "anomalous_first", weights=lite0_weights, references=references)


def launch(processes: int, jobs: list[dict], data: dict, tmp_path: Path) -> dict[str, list[dict]]:
    """Runs the jobs in `processes` torchrun processes; returns each job's per-rank reports, rank order."""
    for job in jobs:
        job.setdefault("output", str(tmp_path / job["name"]))
    spec = dict(config=CONFIG, weights=str(data["weights"]), jobs=jobs, report_dir=str(tmp_path))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    # --standalone: a free rendezvous port, so concurrent test runs do not collide. One thread per process.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(WORKER), str(tmp_path / "spec.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-12000:]
    reports = {}
    for job in jobs:
        reports[job["name"]] = [json.loads((tmp_path / f"{job['name']}-rank{rank}.json").read_text()) for rank in range(processes)]
        for rank, report in enumerate(reports[job["name"]]):
            assert (report["rank"], report["world"]) == (rank, processes), report
            assert (report["logged_rank"], report["logged_world"]) == (rank, processes), report
            assert "MULTI_CPU" in report["distributed_type"], report
    return reports


def images_per_rank(reports: list[dict]) -> list[int]:
    return [report["images"] for report in reports]


def covariance_of(packed: torch.Tensor) -> torch.Tensor:
    """Sigma = (W^T W)^-1 from a stored float32 whitening factor W, in float64."""
    channels = int((np.sqrt(8 * packed.shape[-1] + 1) - 1) / 2)
    whitening = unpack_lower(packed.double(), channels, torch.float64).dense(dtype=torch.float64)
    cholesky = torch.linalg.solve_triangular(whitening, torch.eye(channels, dtype=torch.float64).expand_as(whitening), upper=False)
    return cholesky @ cholesky.transpose(1, 2)


def assert_equals_one_process_fit(model_dir: Path, reference_dir: Path) -> None:
    model, reference = PadimModel.from_pretrained(model_dir), PadimModel.from_pretrained(reference_dir)
    assert model.config.num_train_images == reference.config.num_train_images
    mean, expected_mean = model.gaussian.mean, reference.gaussian.mean
    assert ((mean - expected_mean).abs().max() / expected_mean.abs().max()) <= 1e-5
    covariance, expected = (covariance_of(m.gaussian.packed()) for m in (model, reference))
    scale = expected.abs().amax(dim=(1, 2), keepdim=True)  # per position, relative to its largest entry
    assert ((covariance - expected).abs() / scale).max() <= 1e-5
    maps, expected_maps = model(PROBE).anomaly_map, reference(PROBE).anomaly_map
    assert ((maps - expected_maps).abs().max() / expected_maps.abs().max()) <= 1e-3
    # Only the main process wrote: one model directory, no staging directory beside it.
    assert not list(model_dir.parent.glob(f".{model_dir.name}.partial-*"))


def test_two_processes_uneven_shards_and_streamed_shards(data, tmp_path):
    jobs = [
        dict(name="folder", kind="folder", path=str(data["folder"])),
        dict(name="stream", kind="hub_stream", path=str(data["repo"])),  # 3 shards on 2 processes: split by example
        # Last job (a later job's collectives would make the other process wait anyway): the main process takes
        # 6 s longer to finalise, and the other process must not wait for it (no barrier after the reduction).
        dict(name="slow_main", kind="folder", path=str(data["folder"]), slow_main_seconds=6),
    ]
    reports = launch(2, jobs, data, tmp_path)
    main, other = reports["slow_main"]
    assert other["returned"] < main["returned"] - 4, (main["returned"], other["returned"])
    assert images_per_rank(reports["folder"]) == [3, 2]
    assert images_per_rank(reports["stream"]) == [3, 2]
    for name in ("folder", "stream"):
        assert_equals_one_process_fit(tmp_path / name, data["references"]["five"])


def test_cli_under_accelerate_launch_multi_gpu_on_cpus_runs_two_cooperating_processes(data, tmp_path):
    # What the README tells CPU users: accelerate's --multi_gpu launcher (torchrun underneath), no --cpu flag.
    # (`accelerate launch --cpu --num_processes 2` starts a single process: accelerate's simple launcher.)
    output = tmp_path / "model"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "padim_hf.fit",
        "--data", str(data["folder"]), "--output-dir", str(output), "--config", "padim-lite0-offline",
        "--backbone-weights", str(data["weights"]), "--batch-size", "2", "--verbose",  # per-process lines are INFO
        *[f"--{k.replace('_', '-')}={v}" for k, v in CONFIG.items() if k not in ("backbone", "layers")],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-12000:]
    lines = [line for line in result.stderr.splitlines() if "padim_hf.fit: process" in line]
    assert sorted(line.split("padim_hf.fit: ")[1] for line in lines) == [
        "process 0/2 (DistributedType.MULTI_CPU, cpu): 3 images",
        "process 1/2 (DistributedType.MULTI_CPU, cpu): 2 images",
    ]
    assert result.stdout.count("fitted on 5 images") == 1  # only the main process saved
    assert_equals_one_process_fit(output, data["references"]["five"])


def test_three_processes_including_ones_that_get_no_image(data, tmp_path):
    two = [str(p) for p in data["images"][:2]]
    jobs = [
        dict(name="folder", kind="folder", path=str(data["folder"])),
        dict(name="two_rows", kind="folder", path=str(data["folder"]), limit=2),  # shards 1, 1, 0
        dict(name="two_paths", kind="paths", paths=two),  # a plain list of paths: 1, 1, 0
        dict(name="stream", kind="hub_stream", path=str(data["repo"])),  # 3 shards on 3 processes: one each
        dict(name="main_empty", kind="hub_stream", path=str(data["anomalous_first"])),  # 0, 1, 1
    ]
    reports = launch(3, jobs, data, tmp_path)
    assert images_per_rank(reports["folder"]) == [2, 2, 1]
    assert images_per_rank(reports["two_rows"]) == [1, 1, 0]
    assert images_per_rank(reports["two_paths"]) == [1, 1, 0]
    assert images_per_rank(reports["stream"]) == [2, 2, 1]
    assert images_per_rank(reports["main_empty"]) == [0, 1, 1]
    assert_equals_one_process_fit(tmp_path / "folder", data["references"]["five"])
    assert_equals_one_process_fit(tmp_path / "stream", data["references"]["five"])
    assert_equals_one_process_fit(tmp_path / "two_rows", data["references"]["two"])
    assert_equals_one_process_fit(tmp_path / "two_paths", data["references"]["two"])
    assert_equals_one_process_fit(tmp_path / "main_empty", data["references"]["two"])


@pytest.mark.parametrize("fails", [False, True])
def test_every_command_releases_the_process_group_it_made(tmp_path, monkeypatch, fails):
    """A process that exits with a gloo group alive can abort after its work is done (exit -6: seen once in this
    suite's 3-process fit, pytorch/pytorch#179291), so `padim-hf` destroys the group after every command."""
    import types

    import torch.distributed as dist

    from padim_hf import cli

    def command(args) -> None:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        if fails:
            raise ValueError("a bad value")

    monkeypatch.setitem(sys.modules, "a_command_module", types.SimpleNamespace(run=command))
    monkeypatch.setitem(cli.COMMANDS, "demo", ("a_command_module:run", "a command that joins a process group"))
    try:
        if fails:
            with pytest.raises(SystemExit, match="1"):
                cli.main(["demo"])
        else:
            cli.main(["demo"])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
