#!/usr/bin/env python
"""Side-by-side benchmark of padim_hf and anomalib's PaDiM (`anomalib.models.image.padim.torch_model.PadimModel`).

Every measurement runs in a fresh subprocess (a "worker"), so peak memory (ru_maxrss on CPU,
`torch.cuda.max_memory_allocated` on CUDA) belongs to that measurement alone. Both implementations get the same
backbone weights (anomalib's timm extractor is loaded with padim_hf's backbone state), the same channel subset
(anomalib's `idx` buffer is set to `config.feature_indices`) and the same images (synthetic, seeded per batch).

Examples:
    python benchmarks/bench_padim.py --configs r18 --n-images 32 256 --repeats 3
    python benchmarks/bench_padim.py --configs wr50 --n-images 32 --anomalib-max-images 32 --repeats 1
    python benchmarks/bench_padim.py --configs r18 --n-images 8 --no-anomalib --no-hazelnut --repeats 1  # smoke
    python benchmarks/bench_padim.py --hazelnut-only --configs lite0 wr50

Outputs a markdown table (stdout and --markdown) and the raw results as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    # name: padim_hf config kwargs, anomalib layer names
    "r18": (dict(backbone="resnet18", layers=(1, 2, 3), n_features=100), ["layer1", "layer2", "layer3"]),
    "wr50": (dict(backbone="wide_resnet50_2", layers=(1, 2, 3), n_features=550), ["layer1", "layer2", "layer3"]),
    "lite0": (dict(backbone="tf_efficientnet_lite0", layers=(1, 2, 3), n_features=100), [1, 2, 3]),
}
# anomalib regularises with 0.01 I + 1e-5 I; the side-by-side models use the same epsilon so maps are comparable.
ANOMALIB_EPSILON = 0.01 + 1e-5
HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad_reduced" / "hazelnut"
if not HAZELNUT.is_dir():
    HAZELNUT = Path("/work/shared/data/mvtec_ad_reduced/hazelnut")


# ----------------------------------------------------------------------------------------------------------- worker


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _current_rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Clock:
    def __init__(self, device):
        self.device = device

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start


def synthetic_batches(n_images: int, batch_size: int, size: int, seed: int, device):
    """Seeded N(0, 1) images (already 'normalised'), generated batch by batch so memory never depends on N."""
    import torch

    for index, start in enumerate(range(0, n_images, batch_size)):
        count = min(batch_size, n_images - start)
        generator = torch.Generator().manual_seed(seed * 100003 + index)
        yield torch.randn(count, 3, size, size, generator=generator).to(device)


def build_padim_hf(args, device, epsilon=None, storage=None):
    import padim_hf
    from padim_hf import PadimConfig, PadimModel

    kwargs, _ = CONFIGS[args.config]
    storage = {"covariance_storage": storage} if storage else {}  # None: PadimConfig's default
    config = PadimConfig(**kwargs, image_size=args.image_size, epsilon=epsilon or args.epsilon, **storage)
    model = PadimModel(config)
    if args.config == "lite0" and args.real_weights:
        from padim_hf.weights import export_lite0_weights

        model.load_backbone_weights(export_lite0_weights(Path(tempfile.gettempdir()) / "padim_bench_lite0.safetensors"))
    return model.to(device).eval(), padim_hf.__file__


def build_anomalib(args, ours, device):
    import torch
    from anomalib.models.image.padim.torch_model import PadimModel as AnomalibPadim

    kwargs, layers = CONFIGS[args.config]
    model = AnomalibPadim(backbone=kwargs["backbone"], layers=layers, pre_trained=False, n_features=kwargs["n_features"])
    target = model.feature_extractor.feature_extractor
    missing, unexpected = target.load_state_dict(ours.backbone.state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"anomalib backbone does not take padim_hf's weights: unexpected {unexpected[:5]}")
    # padim_hf drops EfficientNet blocks after the last used stage; anomalib keeps (and runs) them: only those may miss.
    used_last = int(ours.backbone.feature_info.module_name()[-1].split(".")[1]) if missing else 0
    for key in missing:
        if not key.startswith("blocks.") or int(key.split(".")[1]) <= used_last:
            raise RuntimeError(f"anomalib backbone misses used weights: {key}")
    model.idx = torch.tensor(ours.config.feature_indices, dtype=torch.long)
    return model.to(device).eval()


def anomalib_fit(model, batches):
    model.train()
    model.feature_extractor.eval()  # anomalib's Lightning module keeps the extractor in eval mode (BN statistics)
    for batch in batches:
        model(batch)
    model.fit()
    model.eval()


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def worker_main(args) -> dict:
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = lambda: Clock(device)  # noqa: E731
    result = dict(phase=args.worker, impl=args.impl, config=args.config, n_images=args.n_images,
                  device=str(device), threads=torch.get_num_threads(), torch=torch.__version__)
    epsilon = ANOMALIB_EPSILON if args.compare_maps else args.epsilon
    ours, padim_file = build_padim_hf(args, device, epsilon=epsilon, storage=args.storage)
    result["padim_hf_file"] = padim_file
    result["covariance_storage"] = ours.config.covariance_storage
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result["rss_after_setup_bytes"] = _current_rss_bytes()
    batches = lambda n, seed: synthetic_batches(n, args.batch_size, args.image_size, seed, device)  # noqa: E731

    if args.worker == "backbone":
        with torch.inference_mode():
            for batch in batches(min(args.batch_size, args.n_images), 99):  # warm-up
                ours.backbone(batch)
            with clock() as timer:
                for batch in batches(args.n_images, 1):
                    ours.backbone(batch)
        result.update(seconds=timer.seconds, images_per_second=args.n_images / timer.seconds)
        return result

    if args.worker != "fit":
        raise ValueError(args.worker)
    model = ours if args.impl == "padim_hf" else build_anomalib(args, ours, device)
    if args.impl == "anomalib":
        ours.gaussian.release_()  # anomalib's model holds its own Gaussian; drop our unused placeholder buffer
    result["rss_after_setup_bytes"] = _current_rss_bytes()

    def time_backbone(n_images, seed):  # same process, same minute: ratios survive a machine shared with others
        with torch.inference_mode():
            for batch in batches(min(args.batch_size, n_images), 99):
                ours.backbone(batch)
            with clock() as timer:
                for batch in batches(n_images, seed):
                    ours.backbone(batch)
        return timer.seconds

    if not args.fit_only:
        result["backbone_seconds_same_process"] = time_backbone(args.n_images, 1)
    with clock() as timer:
        if args.impl == "padim_hf":
            model.fit(batches(args.n_images, 1), allow_random_backbone=True)
        else:
            anomalib_fit(model, batches(args.n_images, 1))
    result["fit_seconds"] = timer.seconds
    result["fit_peak_rss_bytes"] = _peak_rss_bytes()
    if device.type == "cuda":
        result["fit_peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    if args.fit_only:
        return result

    # checkpoint size on disk
    with tempfile.TemporaryDirectory() as tmp:
        if args.impl == "padim_hf":
            model.save_pretrained(tmp)
            result["checkpoint_bytes"] = dir_size(Path(tmp))
            state = model.state_dict()
            result["gaussian_bytes"] = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith("gaussian."))
        else:
            file = Path(tmp) / "padim.pt"
            torch.save(model.state_dict(), file)
            result["checkpoint_bytes"] = file.stat().st_size
            result["gaussian_bytes"] = model.gaussian.mean.numel() * 4 + model.gaussian.inv_covariance.numel() * 4

    # predict throughput (batch `batch_size`) and batch-1 latency
    def predict(batch):
        output = model(batch)
        return (output.anomaly_map, output.pred_score)

    result["backbone_predict_images_per_second"] = args.predict_images / time_backbone(args.predict_images, 2)
    with torch.inference_mode():
        predict(next(iter(batches(args.batch_size, 98))))  # warm-up (also builds padim_hf's unpacked cache)
        with clock() as timer:
            first = None
            for batch in batches(args.predict_images, 2):
                maps, scores = predict(batch)
                if first is None:
                    first = (maps[:4].float().cpu(), scores[:4].float().cpu().flatten())
        result["predict_seconds"] = timer.seconds
        result["predict_images_per_second"] = args.predict_images / timer.seconds
        single = next(iter(synthetic_batches(1, 1, args.image_size, 97, device)))
        predict(single)
        latencies = []
        for _ in range(args.latency_repeats):
            with clock() as timer:
                predict(single)
            latencies.append(timer.seconds)
        result["latency_b1_seconds"] = statistics.median(latencies)
    if args.save_maps:
        torch.save({"maps": first[0], "scores": first[1]}, args.save_maps)
    return result


# --------------------------------------------------------------------------------------------------- hazelnut worker


def load_hazelnut(processor, size):
    import numpy as np
    import PIL.Image
    import torch

    def images(paths):
        return processor([PIL.Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]

    train = sorted((HAZELNUT / "train" / "good").glob("*.png"))
    test = sorted((HAZELNUT / "test").glob("*/*.png"))
    masks = []
    for path in test:
        mask_path = HAZELNUT / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        if path.parent.name == "good":
            masks.append(np.zeros((size, size), dtype=bool))
        else:
            mask = PIL.Image.open(mask_path).convert("L").resize((size, size), PIL.Image.NEAREST)
            masks.append(np.array(mask) > 0)
    labels = [int(p.parent.name != "good") for p in test]
    return images(train), images(test), torch.from_numpy(np.stack(masks)), labels


def hazelnut_main(args) -> dict:
    """Fits on hazelnut train/good (50 images), scores the 10 test images: pixel/image AUROC and maps."""
    import torch
    from sklearn.metrics import roc_auc_score

    from padim_hf import PadimImageProcessor, PadimModel

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    epsilon = ANOMALIB_EPSILON if args.compare_maps else args.epsilon
    ours, padim_file = build_padim_hf(args, device, epsilon=epsilon)
    processor = PadimImageProcessor.from_padim_config(ours.config)
    train, test, masks, labels = load_hazelnut(processor, args.image_size)
    result = dict(phase="hazelnut", impl=args.impl, config=args.config, padim_hf_file=padim_file,
                  real_weights=bool(args.config == "lite0" and args.real_weights), n_train=len(train), n_test=len(test))

    def metrics(maps, scores):
        maps, scores = maps.float().cpu(), scores.float().cpu()
        return dict(
            pixel_auroc=float(roc_auc_score(masks.flatten().numpy(), maps[:, 0].flatten().numpy())),
            image_auroc=float(roc_auc_score(labels, scores.numpy())),
            scores=scores.tolist(),
        )

    split = lambda x: [x[i : i + args.batch_size].to(device) for i in range(0, len(x), args.batch_size)]  # noqa: E731

    def predict(model):
        out = [model(x) for x in split(test)]
        return torch.cat([o.anomaly_map for o in out]), torch.cat([o.pred_score for o in out]).flatten()

    outputs = {}
    with torch.inference_mode():
        if args.impl == "padim_hf":
            del ours
            with tempfile.TemporaryDirectory() as tmp:
                for storage in ("float32", "float16"):
                    # each storage fits on its own: the finalisation precision follows the storage dtype
                    torch.manual_seed(0)  # same (random-init) backbone weights for both
                    model, _ = build_padim_hf(args, device, epsilon=epsilon, storage=storage)
                    started = time.perf_counter()
                    model.fit(split(train), allow_random_backbone=True)
                    fit_seconds = time.perf_counter() - started
                    in_memory = predict(model)
                    model.save_pretrained(f"{tmp}/{storage}")
                    del model
                    loaded = PadimModel.from_pretrained(f"{tmp}/{storage}").to(device).eval()
                    outputs[storage] = predict(loaded)
                    del loaded
                    result[storage] = metrics(*outputs[storage])
                    result[storage].update(
                        fit_seconds=fit_seconds,
                        checkpoint_bytes=dir_size(Path(f"{tmp}/{storage}")),
                        reload_identical=bool(torch.equal(in_memory[0], outputs[storage][0])),
                    )
                    result[f"checkpoint_bytes_{storage}"] = result[storage]["checkpoint_bytes"]
            maps32, scores32 = outputs["float32"]
            maps16, scores16 = outputs["float16"]
            result["float16_vs_float32"] = dict(
                pixel_auroc_abs_diff=abs(result["float16"]["pixel_auroc"] - result["float32"]["pixel_auroc"]),
                image_auroc_abs_diff=abs(result["float16"]["image_auroc"] - result["float32"]["image_auroc"]),
                image_score_max_rel_diff=float(((scores16 - scores32).abs() / scores32.abs()).max()),
                map_max_rel_diff=float(((maps16 - maps32).abs().amax() / maps32.abs().amax())),
            )
            maps, scores = maps32, scores32
        else:
            model = build_anomalib(args, ours, device)
            del ours
            anomalib_fit(model, split(train))
            maps, scores = predict(model)
            result["float32"] = metrics(maps, scores)
    if args.save_maps:
        torch.save({"maps": maps.float().cpu(), "scores": scores.float().cpu().flatten()}, args.save_maps)
    return result


# --------------------------------------------------------------------------------------------------------- driver


def run_worker(argv: list[str], timeout: float) -> dict:
    command = [sys.executable, os.path.abspath(__file__), *argv]
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if process.returncode != 0:
        sys.stderr.write(process.stderr[-4000:])
        return dict(error=f"worker exited {process.returncode}", argv=argv, stderr_tail=process.stderr[-2000:])
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_seconds"] = time.perf_counter() - started
    return result


def machine_description(device: str) -> dict:
    import torch

    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu_model"] = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import anomalib

        info["anomalib"] = anomalib.__version__
    except ImportError:
        info["anomalib"] = None
    return info


def median_of(results: list[dict], key: str):
    values = [r[key] for r in results if key in r and r[key] is not None]
    return statistics.median(values) if values else None


def compare_maps(path_a: Path, path_b: Path) -> dict:
    import torch

    a, b = torch.load(path_a), torch.load(path_b)
    scale = b["maps"].abs().amax()
    return dict(
        map_max_abs_diff=float((a["maps"] - b["maps"]).abs().amax()),
        map_max_rel_diff=float((a["maps"] - b["maps"]).abs().amax() / scale),
        score_max_rel_diff=float(((a["scores"] - b["scores"]).abs() / b["scores"].abs()).max()),
    )


def gb(value):
    return None if value is None else value / 2**30


def fmt(value, digits=2, suffix=""):
    if value is None:
        return "-"
    return f"{value:.{digits}f}{suffix}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["r18"], choices=sorted(CONFIGS))
    parser.add_argument("--n-images", nargs="+", type=int, default=[32, 256], help="training set sizes for fit")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process repeats per measurement (median)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--predict-images", type=int, default=64, help="images scored for throughput")
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in workers (0: torch default)")
    parser.add_argument("--epsilon", type=float, default=0.01)
    parser.add_argument("--storage", default="", choices=["", "float32", "float16"],
                        help="padim_hf covariance_storage (default: PadimConfig's default)")
    parser.add_argument("--no-anomalib", action="store_true", help="measure padim_hf only")
    parser.add_argument("--anomalib-max-images", type=int, default=256,
                        help="skip anomalib fits above this N (it keeps every embedding: memory grows with N)")
    parser.add_argument("--fit-only-above", type=int, default=256,
                        help="for N above this, measure fit only (memory flatness), no predict/checkpoint")
    parser.add_argument("--no-hazelnut", action="store_true", help="skip the hazelnut accuracy comparison")
    parser.add_argument("--hazelnut-only", action="store_true", help="run only the hazelnut accuracy comparison")
    parser.add_argument("--no-real-weights", dest="real_weights", action="store_false",
                        help="lite0: keep the random backbone instead of the ImageNet Lite0 weights")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    # worker-only options
    parser.add_argument("--worker", choices=["backbone", "fit", "hazelnut"], help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="padim_hf", choices=["padim_hf", "anomalib"], help=argparse.SUPPRESS)
    parser.add_argument("--config", default="r18", help=argparse.SUPPRESS)
    parser.add_argument("--fit-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compare-maps", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save-maps", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-image", dest="n_image_worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.n_images = args.n_image_worker
        result = hazelnut_main(args) if args.worker == "hazelnut" else worker_main(args)
        print("RESULT " + json.dumps(result))
        return 0

    common = ["--device", args.device, "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
              "--threads", str(args.threads), "--epsilon", str(args.epsilon),
              "--predict-images", str(args.predict_images), "--latency-repeats", str(args.latency_repeats)]
    if not args.real_weights:
        common.append("--no-real-weights")
    report = dict(machine=machine_description(args.device), args={k: str(v) for k, v in vars(args).items()},
                  runs=[], summary=[], hazelnut=[])
    if not args.no_anomalib and report["machine"]["anomalib"] is None:
        print("anomalib is not installed: measuring padim_hf only (see benchmarks/requirements.txt)", file=sys.stderr)
        args.no_anomalib = True
    impls = ["padim_hf"] if args.no_anomalib else ["padim_hf", "anomalib"]
    tmpdir = Path(tempfile.mkdtemp(prefix="padim_bench_"))

    def log(message):
        print(message, file=sys.stderr, flush=True)

    if not args.hazelnut_only:
        for config in args.configs:
            for n in args.n_images:
                row = dict(config=config, n_images=n)
                runs = []
                for repeat in range(args.repeats):
                    log(f"[{config} N={n}] backbone repeat {repeat}")
                    runs.append(run_worker(["--worker", "backbone", "--config", config, "--n-image", str(n), *common], args.timeout))
                report["runs"] += runs
                row["backbone_seconds"] = median_of(runs, "seconds")
                for impl in impls:
                    if impl == "anomalib" and n > args.anomalib_max_images:
                        continue
                    fit_only = n > args.fit_only_above
                    runs = []
                    for repeat in range(args.repeats):
                        log(f"[{config} N={n}] {impl} fit repeat {repeat}")
                        extra = ["--fit-only"] if fit_only else []
                        if repeat == 0 and not fit_only:
                            extra += ["--compare-maps", "--save-maps", str(tmpdir / f"{config}_{n}_{impl}.pt")]
                        runs.append(run_worker(["--worker", "fit", "--impl", impl, "--config", config, "--n-image", str(n),
                                                "--storage", args.storage, *common, *extra], args.timeout))
                    report["runs"] += runs
                    for key in ("backbone_seconds_same_process", "backbone_predict_images_per_second", "fit_seconds", "fit_peak_rss_bytes", "fit_peak_cuda_bytes", "checkpoint_bytes", "gaussian_bytes",
                                "predict_images_per_second", "latency_b1_seconds"):
                        row[f"{impl}.{key}"] = median_of(runs, key)
                    errors = [r["error"] for r in runs if "error" in r]
                    if errors:
                        row[f"{impl}.error"] = errors[0]
                a, b = tmpdir / f"{config}_{n}_padim_hf.pt", tmpdir / f"{config}_{n}_anomalib.pt"
                if a.exists() and b.exists():
                    row["maps_padim_hf_vs_anomalib"] = compare_maps(a, b)
                report["summary"].append(row)
                log(json.dumps(row))

    if not args.no_hazelnut:
        for config in args.configs:
            for impl in impls:
                log(f"[{config}] hazelnut {impl}")
                maps = tmpdir / f"hazelnut_{config}_{impl}.pt"
                result = run_worker(["--worker", "hazelnut", "--impl", impl, "--config", config, *common,
                                     "--compare-maps", "--save-maps", str(maps)], args.timeout)
                report["hazelnut"].append(result)
            a, b = tmpdir / f"hazelnut_{config}_padim_hf.pt", tmpdir / f"hazelnut_{config}_anomalib.pt"
            if a.exists() and b.exists():
                report["hazelnut"].append(dict(config=config, maps_padim_hf_vs_anomalib=compare_maps(a, b)))

    markdown = render_markdown(report)
    print(markdown)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
    failed = [r for r in report["runs"] + report["hazelnut"] if "error" in r]
    return 1 if failed else 0


def render_markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"Machine: {machine.get('cpu_model')} ({machine.get('cpu_count')} CPUs, {machine.get('memory_gb')} GB), "
        f"torch {machine.get('torch')} ({machine.get('torch_threads')} threads), anomalib {machine.get('anomalib')}"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ""),
        "",
    ]
    if report["summary"]:
        lines += [
            "Ratios divide by the backbone-only time measured in the same process just before (fit: same N images; "
            "predict: same images). The 'backbone only' rows come from separate processes.",
            "",
            "| config | N | impl | fit s | fit / backbone | peak fit RSS GB | predict img/s | predict / backbone | "
            "batch-1 ms | checkpoint GB | Gaussian GB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in report["summary"]:
            backbone = row.get("backbone_seconds")
            backbone_ips = row["n_images"] / backbone if backbone else None
            lines.append(f"| {row['config']} | {row['n_images']} | backbone only | {fmt(backbone)} | 1.00 | - | "
                         f"{fmt(backbone_ips, 1)} | 1.00 | - | - | - |")
            for impl in ("padim_hf", "anomalib"):
                fit = row.get(f"{impl}.fit_seconds")
                if fit is None and f"{impl}.error" not in row:
                    continue
                ips = row.get(f"{impl}.predict_images_per_second")
                same_fit = row.get(f"{impl}.backbone_seconds_same_process")
                same_ips = row.get(f"{impl}.backbone_predict_images_per_second")
                latency = row.get(f"{impl}.latency_b1_seconds")
                peak = row.get(f"{impl}.fit_peak_cuda_bytes") or row.get(f"{impl}.fit_peak_rss_bytes")
                lines.append(
                    f"| {row['config']} | {row['n_images']} | {impl} | {fmt(fit)} | "
                    f"{fmt(fit / same_fit if fit and same_fit else None)} | {fmt(gb(peak))} | {fmt(ips, 1)} | "
                    f"{fmt(ips / same_ips if ips and same_ips else None)} | "
                    f"{fmt(latency * 1000 if latency else None, 1)} | {fmt(gb(row.get(f'{impl}.checkpoint_bytes')), 3)} | "
                    f"{fmt(gb(row.get(f'{impl}.gaussian_bytes')), 3)} |"
                )
            cmp = row.get("maps_padim_hf_vs_anomalib")
            if cmp:
                lines.append(f"|  |  | maps padim_hf vs anomalib | max abs diff {cmp['map_max_abs_diff']:.2e}, "
                             f"max rel {cmp['map_max_rel_diff']:.2e}, score rel {cmp['score_max_rel_diff']:.2e} |"
                             + " |" * 7)
        lines.append("")
    if report["hazelnut"]:
        lines += ["| hazelnut config | impl | storage | pixel AUROC | image AUROC | checkpoint GB |", "|---|---|---|---|---|---|"]
        for result in report["hazelnut"]:
            if "impl" not in result:
                continue
            for storage in ("float32", "float16"):
                if storage in result:
                    size = result.get(f"checkpoint_bytes_{storage}")
                    lines.append(f"| {result['config']}{' (ImageNet)' if result.get('real_weights') else ' (random)'} | "
                                 f"{result['impl']} | {storage} | {result[storage]['pixel_auroc']:.4f} | "
                                 f"{result[storage]['image_auroc']:.4f} | {fmt(gb(size), 3)} |")
        lines.append("")
        for result in report["hazelnut"]:
            if "float16_vs_float32" in result:
                d = result["float16_vs_float32"]
                lines.append(f"- {result['config']}: float16 vs float32 storage: pixel AUROC diff {d['pixel_auroc_abs_diff']:.2e}, "
                             f"image AUROC diff {d['image_auroc_abs_diff']:.2e}, image score max rel diff "
                             f"{d['image_score_max_rel_diff']:.2e}, map max rel diff {d['map_max_rel_diff']:.2e}")
            if "maps_padim_hf_vs_anomalib" in result:
                d = result["maps_padim_hf_vs_anomalib"]
                lines.append(f"- {result['config']}: padim_hf vs anomalib maps: max abs diff {d['map_max_abs_diff']:.2e}, "
                             f"max rel diff {d['map_max_rel_diff']:.2e}, image score max rel diff {d['score_max_rel_diff']:.2e}")
        lines.append("")
    errors = [r for r in report["runs"] + report["hazelnut"] if "error" in r]
    for error in errors:
        lines.append(f"- ERROR {error['error']}: {' '.join(error['argv'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
