"""Peak memory of `evaluate` on many large test images: streamed metrics vs the exact in-memory reference.

Builds an MVTec-style category whose test split holds N 1024 x 1024 images: MVTec hazelnut's test images (and
masks) upsampled (bicubic / nearest), repeated as hard links (no extra disk, every file is decoded on its own). The
model is Lite0 (`padim-lite0-offline`, 256 px) fitted on hazelnut's training images. Every measurement runs in a
fresh subprocess and reports its peak RSS (`ru_maxrss` from `os.wait4`):

- `streamed`: `padim_hf.evaluate.evaluate_padim` (histogram metrics), per protocol;
- `exact`: the reference that keeps every map and mask in memory and computes exact metrics
  (sklearn's `roc_auc_score`, `padim_hf.metrics.aupro`), i.e. what the previous `evaluate` did at original size.

    python benchmarks/bench_evaluate_memory.py --workdir /tmp/padim-evalmem --n-images 1000 --exact-n-images 60
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad_reduced" / "hazelnut"


def build_category(source: Path, target: Path, n_images: int, size: int) -> Path:
    """`target`/test/<defect>/<i>.png (+ ground_truth masks): `n_images` links to the upsampled test images."""
    import PIL.Image

    if (target / "done").is_file():
        return target
    unique = target / "unique"
    originals = sorted((source / "test").glob("*/*.png"))
    for path in originals:
        defect = path.parent.name
        (unique / defect).mkdir(parents=True, exist_ok=True)
        PIL.Image.open(path).convert("RGB").resize((size, size), PIL.Image.BICUBIC).save(unique / defect / path.name)
        if defect != "good":
            mask = PIL.Image.open(source / "ground_truth" / defect / f"{path.stem}_mask.png").convert("L")
            mask.resize((size, size), PIL.Image.NEAREST).save(unique / defect / f"{path.stem}_mask.png")
    for index in range(n_images):
        original = originals[index % len(originals)]
        defect = original.parent.name
        (target / "test" / defect).mkdir(parents=True, exist_ok=True)
        os.link(unique / defect / original.name, target / "test" / defect / f"{index:05d}.png")
        if defect != "good":
            (target / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            os.link(unique / defect / f"{original.stem}_mask.png", target / "ground_truth" / defect / f"{index:05d}_mask.png")
    (target / "train").mkdir(exist_ok=True)
    if not (target / "train" / "good").exists():
        (target / "train" / "good").symlink_to(source / "train" / "good")
    (target / "done").write_text("ok")
    return target


def fit_model(data: Path, model_dir: Path) -> Path:
    if not (model_dir / "config.json").is_file():
        from padim_hf.fit import build_model, fit_padim, save_fitted, training_split

        model = fit_padim(build_model("padim-lite0-offline"), training_split(str(data), "train"), progress=False)
        save_fitted(model, model_dir)
    return model_dir


def child(mode: str, protocol: str, model_dir: str, data: str, n_images: int, batch_size: int) -> dict:
    """One measurement (runs in its own process)."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from padim_hf import PadimImageProcessor, PadimModel
    from padim_hf.data import mvtec_split
    from padim_hf.evaluate import EvaluationCollator, evaluate_padim
    from padim_hf.metrics import aupro, auroc

    model = PadimModel.from_pretrained(model_dir).eval()
    processor = PadimImageProcessor.from_pretrained(model_dir)
    dataset = mvtec_split(data, "test")
    dataset = dataset.select(range(min(n_images, len(dataset))))
    started = time.perf_counter()
    if mode == "streamed":
        result = evaluate_padim(model, dataset, processor=processor, protocol=protocol, batch_size=batch_size, progress=False)
        metrics = result.metrics()
    else:
        maps, masks, scores = [], [], []
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=EvaluationCollator(processor, protocol))
        with torch.no_grad():
            for batch in loader:
                output = model(batch["pixel_values"])
                scores.extend(output.pred_score.tolist())
                if protocol == "original":
                    maps.extend(m.numpy() for m in processor.post_process_anomaly_maps(output.anomaly_map, batch["sizes"]))
                else:
                    maps.extend(output.anomaly_map[:, 0].numpy())
                masks.extend(batch["masks"])
        flat_masks = np.concatenate([m.ravel() for m in masks])
        flat_maps = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
        metrics = {"pixel_auroc": auroc(flat_masks, flat_maps), "pixel_aupro": aupro(masks, maps)}
    return {"mode": mode, "protocol": protocol, "n_images": len(dataset), "seconds": time.perf_counter() - started, **metrics}


def measure(args: argparse.Namespace, mode: str, protocol: str, n_images: int, model_dir: Path, data: Path) -> dict:
    command = [sys.executable, __file__, "--child", mode, protocol, str(model_dir), str(data), str(n_images), str(args.batch_size)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{command} failed with status {status}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_gib"] = usage.ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB on Linux
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, protocol, model_dir, data, n_images, batch_size = sys.argv[2:8]
        print(json.dumps(child(mode, protocol, model_dir, data, int(n_images), int(batch_size))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--exact-n-images", type=int, default=60, help="images for the in-memory reference (0: skip)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--protocols", nargs="+", default=["model", "original"])
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args()
    data = build_category(HAZELNUT, args.workdir / f"hazelnut{args.size}x{args.n_images}", args.n_images, args.size)
    model_dir = fit_model(data, args.workdir / "model-lite0")
    results = []
    for protocol in args.protocols:
        if args.exact_n_images:
            exact = measure(args, "exact", protocol, args.exact_n_images, model_dir, data)
            streamed_small = measure(args, "streamed", protocol, args.exact_n_images, model_dir, data)
            for key in ("pixel_auroc", "pixel_aupro"):
                streamed_small[f"{key}_minus_exact"] = streamed_small[key] - exact[key]
            results += [exact, streamed_small]
        results.append(measure(args, "streamed", protocol, args.n_images, model_dir, data))
    print("\n| mode | protocol | images | peak RSS (GiB) | seconds | pixel AUROC | AUPRO |\n|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['protocol']} | {r['n_images']} | {r['peak_rss_gib']:.2f} | {r['seconds']:.0f} | "
              f"{r['pixel_auroc']:.6f} | {r['pixel_aupro']:.6f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
