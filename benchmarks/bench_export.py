"""CPU inference benchmark of padim_hf's engines (torch eager, ONNX Runtime, OpenVINO) against anomalib 2.7's
PaDiM torch model and anomalib's own OpenVINO export (`Padim.to_openvino`, run as anomalib's OpenVINOInferencer
compiles it: default config; and with float32 pinned).

Same random backbone weights and the same Gaussian in both implementations (a diagonal whitening factor W, so
anomalib's inverse covariance is W^T W exactly), same 224 px inputs. Every measurement runs in a fresh subprocess so
peak RSS (VmHWM) is that of one engine: load from disk + predict. Throughput: median batch time over timed
batches of 32 after a warm-up batch; latency: median of batch-1 runs after a warm-up. Map difference: max |map -
reference| / max |reference| on 4 probe images, reference = that implementation's torch eager maps (and, for
anomalib's torch vs ours, the cross-implementation difference).

Run in the benchmark venv (anomalib installed, see benchmarks/requirements.txt):

    flock /work/coord/heavy.lock .venv-bench/bin/python benchmarks/bench_export.py --configs r18 wr50 \
        --output benchmarks/results/export_cpu.json
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "r18": dict(backbone="resnet18", n_features=100),
    "wr50": dict(backbone="wide_resnet50_2", n_features=550),
}
LAYERS = ["layer1", "layer2", "layer3"]
SIZE = 224
PROBE = 4
ENGINES = ["ours-torch", "ours-onnxruntime", "ours-openvino", "ours-openvino-bf16", "anomalib-torch", "anomalib-openvino",
           "anomalib-openvino-f32"]


def peak_rss() -> int:
    """This process's peak RSS: VmHWM, the high-water mark of its own address space. (ru_maxrss also counts the
    parent's peak: Linux folds the forking parent's high-water mark into the child's at exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def images(count: int, seed: int):
    """(count, 3, 224, 224) float32 images in [0, 1] (raw) and ImageNet-normalised (what the models take)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    raw = rng.random((count, 3, SIZE, SIZE), dtype=np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return raw, (raw - mean) / std


# ---------------------------------------------------------------------------------------------------------- prepare

def prepare_ours(config_name: str, workdir: Path, export: bool = True) -> dict:
    import torch

    from padim_hf import PadimConfig, PadimModel
    from padim_hf.export import export_onnx, export_openvino

    torch.manual_seed(0)
    config = PadimConfig(**CONFIGS[config_name], image_size=SIZE)
    model = PadimModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    model.gaussian.mean.normal_(generator=generator)
    whitening = model.gaussian.whitening()
    # Diagonal W in [0.5, 1.5), rounded to float16 (the checkpoint's storage) so both models use the same values.
    diagonal = (torch.rand(model.gaussian.mean.shape, generator=generator) + 0.5).half().float()
    for block, (start, stop) in zip(whitening.blocks, whitening.row_ranges):
        block.diagonal(offset=start, dim1=1, dim2=2).copy_(diagonal[:, start:stop])
    model.config.num_train_images = 1
    model.save_pretrained(workdir / "ours")
    torch.save({"backbone": model.backbone.state_dict(), "mean": model.gaussian.mean, "diagonal": diagonal,
                "feature_indices": torch.tensor(config.feature_indices)}, workdir / "shared_state.pt")
    timings = {}
    for fmt, exporter in (("onnx", export_onnx), ("openvino", export_openvino)) if export else ():
        start = time.perf_counter()
        exporter(model, workdir / "ours" / fmt)
        timings[f"export_{fmt}_seconds"] = time.perf_counter() - start
    return {**timings, "peak_rss_bytes": peak_rss()}


def build_anomalib_lightning(config_name: str, workdir: Path):
    import torch
    from anomalib.models import Padim
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    state = torch.load(workdir / "shared_state.pt")
    transform = Compose([Resize((SIZE, SIZE)), Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    lightning = Padim(backbone=CONFIGS[config_name]["backbone"], layers=LAYERS, pre_trained=False,
                      n_features=CONFIGS[config_name]["n_features"], pre_processor=PreProcessor(transform=transform),
                      post_processor=False, evaluator=False, visualizer=False)
    model = lightning.model
    missing, unexpected = model.feature_extractor.feature_extractor.load_state_dict(state["backbone"], strict=False)
    if missing or unexpected:
        raise RuntimeError(f"backbone state does not match anomalib's: {missing[:3]} {unexpected[:3]}")
    model.idx = state["feature_indices"]
    model.gaussian.mean = state["mean"].T.contiguous()  # anomalib: (C, P)
    squared = state["diagonal"].square()
    inverse = torch.zeros(squared.shape[0], squared.shape[1], squared.shape[1])
    inverse.diagonal(dim1=1, dim2=2).copy_(squared)
    model.gaussian.inv_covariance = inverse
    return lightning.eval()


def prepare_anomalib(config_name: str, workdir: Path, export: bool) -> dict:
    import torch

    lightning = build_anomalib_lightning(config_name, workdir)
    torch.save(lightning.model.state_dict(), workdir / "anomalib_model.pt")
    if not export:
        return {"peak_rss_bytes": peak_rss()}
    start = time.perf_counter()
    try:
        path = lightning.to_openvino(workdir / "anomalib_export", input_size=(SIZE, SIZE))
        result = {"export_openvino_seconds": time.perf_counter() - start, "xml": str(path)}
    except Exception as error:  # reported in the table: anomalib's own export failing is a finding
        result = {"export_error": f"{type(error).__name__}: {str(error)[:300]}"}
    return {**result, "peak_rss_bytes": peak_rss()}


# ---------------------------------------------------------------------------------------------------------- measure

def load_engine(engine: str, config_name: str, workdir: Path):
    """Loads `engine` from disk; returns run(normalised, raw) -> (maps (B, H, W) numpy, scores (B,))."""
    import numpy as np

    if engine == "ours-torch":
        import torch

        from padim_hf import PadimModel

        model = PadimModel.from_pretrained(workdir / "ours").eval()

        def run(normalised, raw):
            with torch.inference_mode():
                output = model(torch.from_numpy(normalised))
            return output.anomaly_map[:, 0].numpy(), output.pred_score.numpy()

        return run
    if engine in ("ours-onnxruntime", "ours-openvino", "ours-openvino-bf16"):
        sys.path.insert(0, str(workdir / "ours" / "onnx"))
        from padim_runtime import PadimRuntime  # the export's own torch-free runtime

        kind = engine.split("-")[1]
        precision = "bfloat16" if engine.endswith("bf16") else "float32"  # bf16: the backbone only
        runtime = PadimRuntime(workdir / "ours" / ("onnx" if kind == "onnxruntime" else "openvino"), kind, precision=precision)

        def run(normalised, raw):
            outputs = runtime.run(normalised)
            return outputs["anomaly_map"][:, 0], outputs["pred_score"]

        return run
    if engine == "anomalib-torch":
        import torch
        from anomalib.models.image.padim.torch_model import PadimModel as AnomalibPadim

        model = AnomalibPadim(backbone=CONFIGS[config_name]["backbone"], layers=LAYERS, pre_trained=False,
                              n_features=CONFIGS[config_name]["n_features"])
        # anomalib's leanest load: one copy of the checkpoint in memory, taken over by the model (assign=True).
        state = torch.load(workdir / "anomalib_model.pt")
        model.gaussian.mean = torch.empty_like(state["gaussian.mean"], device="meta")
        model.gaussian.inv_covariance = torch.empty_like(state["gaussian.inv_covariance"], device="meta")
        model.load_state_dict(state, assign=True)
        del state
        model.eval()

        def run(normalised, raw):
            with torch.inference_mode():
                output = model(torch.from_numpy(normalised))
            return output.anomaly_map[:, 0].numpy(), output.pred_score.numpy().reshape(-1)

        return run
    if engine.startswith("anomalib-openvino"):
        from anomalib.deploy import OpenVINOInferencer

        # The inferencer writes an OpenVINO model cache to ./openvino_cache (3.9 GB for WR50): keep it in the scratch
        # folder, never in the checkout.
        os.chdir(workdir)

        xml = workdir / "anomalib_export" / "weights" / "openvino" / "model.xml"
        if not xml.is_file():
            raise FileNotFoundError(f"anomalib's export is missing ({xml})")
        config = {"INFERENCE_PRECISION_HINT": "f32"} if engine.endswith("f32") else None
        inferencer = OpenVINOInferencer(path=xml, device="CPU", config=config)
        compiled = inferencer.model

        def run(normalised, raw):
            outputs = compiled(raw)  # anomalib's graph normalises itself
            named = {output.get_any_name(): value for output, value in outputs.items()}
            return np.asarray(named["anomaly_map"]).reshape(raw.shape[0], SIZE, SIZE), np.asarray(named["pred_score"]).reshape(-1)

        return run
    raise ValueError(engine)


def timed_runs(run, batch_size: int, count: int) -> list[float]:
    """Seconds of `count` runs on fresh batches of `batch_size` images, after one warm-up run."""
    raw, normalised = images(batch_size, seed=0)
    run(normalised, raw)
    times = []
    for index in range(count):
        raw, normalised = images(batch_size, seed=index + 1)
        begin = time.perf_counter()
        run(normalised, raw)
        times.append(time.perf_counter() - begin)
    return times


def measure(engine: str, config_name: str, workdir: Path, mode: str, batches: int) -> dict:
    import numpy as np

    start = time.perf_counter()
    run = load_engine(engine, config_name, workdir)
    result = {"load_seconds": time.perf_counter() - start}
    if mode == "throughput":
        times = timed_runs(run, 32, batches)
        result["batch_seconds"] = times
        result["images_per_second"] = 32 / statistics.median(times)
        raw, normalised = images(PROBE, seed=99)
        maps, scores = run(normalised, raw)
        np.save(workdir / f"maps_{engine}.npy", maps)
        np.save(workdir / f"scores_{engine}.npy", scores)
    else:
        times = timed_runs(run, 1, batches)
        result["latency_seconds"] = statistics.median(times)
        result["latencies"] = times
    result["peak_rss_bytes"] = peak_rss()
    return result


# ------------------------------------------------------------------------------------------------------------ driver

def worker(argv: list[str], timeout: float) -> dict:
    completed = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else f"rc {completed.returncode}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def relative(a, b) -> float:
    import numpy as np

    return float(np.abs(a - b).max() / np.abs(b).max())


def machine() -> dict:
    import onnxruntime
    import openvino
    import torch

    try:
        import anomalib

        anomalib_version = anomalib.__version__
    except ImportError:
        anomalib_version = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__, "anomalib": anomalib_version,
            "torch_threads": torch.get_num_threads(), "gpu": "none (no GPU in this session)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["r18", "wr50"], choices=list(CONFIGS))
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    parser.add_argument("--batches", type=int, default=3, help="timed batches of 32")
    parser.add_argument("--latency-runs", type=int, default=7)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/export_cpu.json"))
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        task, config_name, workdir, *rest = args.worker
        workdir = Path(workdir)
        if task == "prepare-ours":
            print(json.dumps(prepare_ours(config_name, workdir, export=rest != ["noexport"])))
        elif task == "prepare-anomalib":
            print(json.dumps(prepare_anomalib(config_name, workdir, export=rest == ["export"])))
        else:
            engine, mode, count = rest
            print(json.dumps(measure(engine, config_name, workdir, mode, int(count))))
        return
    report = {"machine": machine(), "command": " ".join(sys.argv), "results": {}}
    for config_name in args.configs:
        with tempfile.TemporaryDirectory(prefix=f"bench_export_{config_name}_") as scratch:
            workdir = Path(scratch)
            export_ours = any(engine.startswith(("ours-onnxruntime", "ours-openvino")) for engine in args.engines)
            row = {"prepare_ours": worker(["prepare-ours", config_name, scratch, *([] if export_ours else ["noexport"])], 3000)}
            report["results"][config_name] = row  # written after every worker: a run cut short keeps what it measured
            print(config_name, "prepare ours", row["prepare_ours"], flush=True)
            if any(engine.startswith("anomalib") for engine in args.engines):
                export = any(engine.startswith("anomalib-openvino") for engine in args.engines)
                row["prepare_anomalib"] = worker(["prepare-anomalib", config_name, scratch, *(["export"] if export else [])], 3000)
                print(config_name, "prepare anomalib", row["prepare_anomalib"], flush=True)
            for engine in args.engines:
                for mode, count in (("throughput", args.batches), ("latency", args.latency_runs)):
                    row[f"{engine}/{mode}"] = worker(["measure", config_name, scratch, engine, mode, str(count)], 3000)
                    print(config_name, engine, mode, {k: v for k, v in row[f"{engine}/{mode}"].items() if not isinstance(v, list)}, flush=True)
                    args.output.parent.mkdir(parents=True, exist_ok=True)
                    args.output.write_text(json.dumps(report, indent=2))
            import numpy as np

            maps = {engine: np.load(workdir / f"maps_{engine}.npy") for engine in args.engines if (workdir / f"maps_{engine}.npy").is_file()}
            scores = {engine: np.load(workdir / f"scores_{engine}.npy") for engine in maps}
            differences = {}
            for engine in maps:
                reference = "anomalib-torch" if engine.startswith("anomalib") else "ours-torch"
                if reference in maps and engine != reference:
                    differences[f"{engine} vs {reference}"] = {
                        "max_map_difference": relative(maps[engine], maps[reference]),
                        "same_score_order": bool((np.argsort(scores[engine]) == np.argsort(scores[reference])).all()),
                    }
            if "ours-torch" in maps and "anomalib-torch" in maps:
                differences["ours-torch vs anomalib-torch"] = {"max_map_difference": relative(maps["ours-torch"], maps["anomalib-torch"])}
            row["map_differences"] = differences
            print(config_name, differences, flush=True)
        report["results"][config_name] = row
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
