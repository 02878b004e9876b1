"""How much OpenVINO's bfloat16 moves PaDiM maps and scores on real images (MVTec hazelnut, real ImageNet
EfficientNet-Lite0 backbone), against padim_hf's float32 torch model: OpenVINO float32, bfloat16 as padim_hf runs
it (`PadimRuntime(precision="bfloat16")`: the whole graph) and bfloat16 for the backbone only (every operation
after the backbone marked `precise`, which OpenVINO keeps in float32) -- the design we measured and dropped.

    .venv/bin/python benchmarks/bfloat16_accuracy.py --root ../shared/data/mvtec_ad_reduced/hazelnut [--wr50]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import openvino
from sklearn.metrics import roc_auc_score

from padim_hf import PadimConfig, PadimImageProcessor, PadimModel
from padim_hf.export import export_openvino
from padim_hf.image_processing_padim import load_image
from padim_hf.runtime import FLOAT32_MARKS, PadimRuntime
from padim_hf.weights import export_lite0_weights

MODELS = {  # name: (config, train images); the first is tests/test_export.py's hazelnut model
    "Lite0, 64 features, 160 px crop 128, 20 train images": (
        PadimConfig(backbone="tf_efficientnet_lite0", layers=(1, 2, 3), n_features=64, image_size=160, crop_size=128), 20),
    "Lite0, 100 features, 256 px, 50 train images": (
        PadimConfig(backbone="tf_efficientnet_lite0", layers=(1, 2, 3), n_features=100, image_size=256), 50),
}
# No ImageNet WR50 weights offline: with --wr50, WR50-Rd550 with timm's random initialisation, as a stress test of
# bfloat16 on a 550-channel Gaussian fitted on fewer images than channels (rank-deficient, epsilon-regularised).
WR50 = {"WR50-Rd550 (random backbone), 224 px, 50 train images": (
    PadimConfig(backbone="wide_resnet50_2", layers=(1, 2, 3), n_features=550, image_size=224), 50)}


def relative(result: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(result - reference).max() / np.abs(reference).max())


def backbone_only_bfloat16(folder: Path, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
    """The export's outputs with only the backbone in bfloat16: the export marks every operation `precise` (OpenVINO's
    DisablePrecisionConversion), so the backbone's marks are removed and the others kept."""
    core = openvino.Core()
    graph = core.read_model(str(folder / "model.xml"))
    for op in graph.get_ops():
        info = op.get_rt_info()
        for mark in FLOAT32_MARKS if op.get_friendly_name().startswith("/backbone/") else ():
            if mark in info:
                del info[mark]
    openvino.save_model(graph, str(folder / "marked.xml"), compress_to_fp16=False)
    compiled = core.compile_model(str(folder / "marked.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    results = compiled({"pixel_values": pixel_values})
    return {key: np.asarray(results[compiled.output(key)]) for key in ("anomaly_map", "pred_score")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/mvtec_ad_reduced/hazelnut"))
    parser.add_argument("--wr50", action="store_true", help="add the WR50-Rd550 random-backbone model (~10 GB peak)")
    args = parser.parse_args()
    tests = sorted((args.root / "test").glob("*/*.png"))
    labels = np.array([path.parent.name != "good" for path in tests])
    with tempfile.TemporaryDirectory() as scratch:
        weights = export_lite0_weights(Path(scratch) / "lite0.safetensors")
        print("| model | engine | max map diff | max score diff | image AUROC |\n|---|---|---|---|---|")
        for name, (config, train_count) in {**MODELS, **(WR50 if args.wr50 else {})}.items():
            model = PadimModel(config)
            random_backbone = config.backbone != "tf_efficientnet_lite0"
            if not random_backbone:
                model.load_backbone_weights(weights)
            processor = PadimImageProcessor.from_padim_config(config)
            train = sorted((args.root / "train" / "good").glob("*.png"))[:train_count]
            model.fit((processor([load_image(p) for p in train[i : i + 10]], return_tensors="pt")["pixel_values"]
                       for i in range(0, train_count, 10)), allow_random_backbone=random_backbone)
            pixel_values = processor([load_image(p) for p in tests], return_tensors="pt")["pixel_values"]
            reference = model(pixel_values)
            folder = Path(scratch) / f"model{len(list(Path(scratch).glob('model*')))}"
            export_openvino(model, folder / "openvino")
            runs = {
                "OpenVINO float32": PadimRuntime(folder / "openvino", "openvino").run(pixel_values.numpy()),
                "OpenVINO bfloat16 (padim_hf's precision='bfloat16')": PadimRuntime(
                    folder / "openvino", "openvino", precision="bfloat16").run(pixel_values.numpy()),
                "OpenVINO bfloat16 backbone, float32 Gaussian": backbone_only_bfloat16(folder / "openvino", pixel_values.numpy()),
            }
            for engine, outputs in runs.items():
                print(f"| {name} | {engine} | {relative(outputs['anomaly_map'], reference.anomaly_map.numpy()):.1e} | "
                      f"{relative(outputs['pred_score'], reference.pred_score.numpy()):.1e} | "
                      f"{roc_auc_score(labels, outputs['pred_score']):.4f} |")


if __name__ == "__main__":
    main()
