"""The README's main job: generate a textured-surface dataset with synthetic defects, fit, evaluate, predict.

The data is the project's own (no download): woven-looking grey textures with random scratches and stains,
written in the MVTec AD layout with exact ground-truth masks.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
from scipy.ndimage import gaussian_filter

DEFECTS = ("scratch", "stain")


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float image in [0, 1]: a weave pattern with random phase plus smooth noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    period = rng.uniform(10, 12)
    weave = np.sin(2 * np.pi * period * x + rng.uniform(0, 2 * np.pi)) * np.sin(2 * np.pi * period * y + rng.uniform(0, 2 * np.pi))
    noise = gaussian_filter(rng.normal(size=(size, size)), sigma=1.5)
    grey = 0.5 + 0.12 * weave + 0.1 * noise / noise.std()
    tint = np.array([1.0, 0.95, 0.85]) * rng.uniform(0.95, 1.05)
    return np.clip(grey[..., None] * tint, 0, 1)


def defect_mask(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """Boolean mask of one synthetic defect, away from the border."""
    mask = PIL.Image.new("L", (size, size), 0)
    draw = PIL.ImageDraw.Draw(mask)
    margin = size // 5
    cx, cy = rng.integers(margin, size - margin, size=2)
    if kind == "scratch":
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.2, 0.35) * size
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=max(2, size // 40))
    else:
        rx, ry = rng.uniform(0.05, 0.1, size=2) * size
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return np.asarray(mask) > 0


def save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


def make_demo_dataset(root: str | Path, n_train: int = 40, n_test_good: int = 6, n_test_defect: int = 6, size: int = 128, seed: int = 0) -> Path:
    """Writes an MVTec-layout dataset of synthetic textures (train/good, test/{good,scratch,stain}, ground_truth)."""
    root, rng = Path(root), np.random.default_rng(seed)
    for index in range(n_train):
        save_png(texture(rng, size), root / "train" / "good" / f"{index:03d}.png")
    for index in range(n_test_good):
        save_png(texture(rng, size), root / "test" / "good" / f"{index:03d}.png")
    for kind in DEFECTS:
        for index in range(n_test_defect):
            image, mask = texture(rng, size), defect_mask(rng, size, kind)
            shade = rng.choice([-1, 1]) * rng.uniform(0.25, 0.35)
            image[mask] = np.clip(image[mask] + shade, 0, 1)
            save_png(image, root / "test" / kind / f"{index:03d}.png")
            mask_path = root / "ground_truth" / kind / f"{index:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    return root


def main(args: argparse.Namespace) -> None:
    """`padim-hf demo` once its options are parsed (padim_hf.commands): dataset, fit, evaluate, predict."""
    from .data import load_split
    from .evaluate import evaluate_padim, load_fitted, print_report, record_evaluation, save_evaluation
    from .fit import build_model, fit_padim, make_accelerator, save_fitted, training_split
    from .predict import predict_images

    started = time.perf_counter()
    out = args.output_dir
    data = make_demo_dataset(out / "data", size=args.image_size)
    model_dir = out / "model"
    model = build_model("padim-lite0-offline", image_size=args.image_size)
    model = fit_padim(model, training_split(str(data)), accelerator=make_accelerator(cpu=True))
    model.config.train_dataset = str(data)
    save_fitted(model, model_dir, overwrite=True)
    model, processor = load_fitted(str(model_dir), cpu=True)
    test = load_split(str(data), "test")
    # Half the test images (stratified, seeded) choose the thresholds; the metrics are on the other half.
    result = evaluate_padim(model, test, processor=processor, calibration=0.5, accelerator=make_accelerator(cpu=True))
    record_evaluation(model, result, {"name": str(data), "config": None, "split": "test"})
    save_evaluation(model, processor, test, result, model_dir)
    report = result.report()
    predict_images(model_dir, [data / "test"], out / "heatmaps", cpu=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print_report(report, as_json=False)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    print(f"  data:     {data}")
    print(f"  model:    {model_dir}  (PadimModel.from_pretrained('{model_dir}'), gallery.png inside)")
    print(f"  heatmaps: {out / 'heatmaps'}  (predictions.csv/json beside them)")
    print(f"  metrics:  {out / 'metrics.json'}")
    print(f"  Space:    {space_command(model_dir)}")


def space_command(model_dir: Path) -> str:
    """The command that opens the Space on `model_dir` with this environment's Python, installing the space extra
    first when gradio is missing. The Space's code is in the repository (spaces/app.py), not in the package."""
    from .extras import install_command, is_installed, source_checkout

    checkout = source_checkout()
    app = checkout / "spaces" / "app.py" if checkout else Path("spaces/app.py")
    run = f"PADIM_MODEL={model_dir.resolve()} {sys.executable} {app}"
    if checkout is None:
        run += "  (from a clone of the padim_hf repository)"
    return run if is_installed("gradio") else f"{install_command('space')} && {run}"


if __name__ == "__main__":  # `python -m padim_hf.demo` (torchrun, accelerate launch): the command line's logging and errors
    from padim_hf.cli import main as command_line

    command_line(["demo", *sys.argv[1:]])
