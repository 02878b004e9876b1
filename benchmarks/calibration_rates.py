"""Good-only calibration on real sets: realised false-alarm rate on test/good and recall on the defects.

For each data set and holdout fraction, fits the offline Lite0 preset on train/good with good-only calibration
(`fit_padim(..., holdout_fraction=F)`), scores the test split once, then moves the threshold to each target rate
with `calibrate(model, false_alarm_rate=R)` (the stored held-out scores; no refit) and counts the verdicts.

    python benchmarks/calibration_rates.py --data ../shared/data/real_defects/bottle \
        ../shared/data/mvtec_ad_reduced/hazelnut --spare-train 0 20 --holdout 0.1 0.25 0.5 --rates 0.01 0.05 0.1 \
        --output benchmarks/results/calibration_rates.json
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from padim_hf.calibration import calibrate
from padim_hf.data import Collator, load_split
from padim_hf.fit import build_model, fit_padim, make_accelerator, training_split
from padim_hf.image_processing_padim import PadimImageProcessor
from padim_hf.metrics import auroc


@torch.no_grad()
def test_scores(model, processor, dataset) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = [], []
    for batch in DataLoader(dataset, batch_size=8, collate_fn=Collator(processor)):
        scores.extend(model(batch["pixel_values"]).pred_score.tolist())
        labels.extend(batch["labels"].tolist())
    return np.asarray(scores), np.asarray(labels)


def run(root: str, fraction: float, rates: list[float], image_size: int, spare: int) -> list[dict]:
    model = build_model("padim-lite0-offline", image_size=image_size)
    train = training_split(root)
    started = time.perf_counter()
    model = fit_padim(model, train.select(range(len(train) - spare)), holdout_fraction=fraction,
                      false_alarm_rate=rates[0], accelerator=make_accelerator(cpu=True), progress=False)
    fit_seconds = time.perf_counter() - started
    processor = PadimImageProcessor.from_padim_config(model.config)
    scores, labels = test_scores(model, processor, load_split(root, "test"))
    if spare:  # train/good images the fit never saw count as more test goods
        more, _ = test_scores(model, processor, train.select(range(len(train) - spare, len(train))))
        scores, labels = np.concatenate([scores, more]), np.concatenate([labels, np.zeros(len(more), int)])
    good, defect = scores[labels == 0], scores[labels == 1]
    held = np.asarray(model.config.calibration["scores"])
    rows = []
    for rate in rates:
        record = calibrate(model, false_alarm_rate=rate).config.calibration
        threshold = record["image_threshold"]
        rows.append({
            "data": Path(root).name + (f" (+{spare} spare train goods)" if spare else ""), "holdout_fraction": fraction, "held_out": record["num_images"],
            "train_images": model.config.num_train_images, "target_rate": rate, "estimable": record["estimable"],
            "expected_rate": record["expected_false_alarm_rate"], "threshold": threshold,
            "test_good": int(len(good)), "false_alarms": int((good >= threshold).sum()),
            "realised_rate": float((good >= threshold).mean()), "test_defects": int(len(defect)),
            "recall": float((defect >= threshold).mean()), "image_auroc": auroc(labels, scores),
            "held_out_median": float(np.median(held)), "test_good_median": float(np.median(good)),
            "test_good_max": float(good.max()), "fit_seconds": round(fit_seconds, 1),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--holdout", nargs="+", type=float, default=[0.1])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.01, 0.05, 0.1])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--spare-train", nargs="+", type=int, default=[0],
                        help="per --data: last N train/good images left out of the fit and counted as test goods")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    spares = args.spare_train * len(args.data) if len(args.spare_train) == 1 else args.spare_train
    rows = [row for root, spare in zip(args.data, spares) for fraction in args.holdout
            for row in run(root, fraction, args.rates, args.image_size, spare)]
    header = ("data", "holdout_fraction", "held_out", "target_rate", "expected_rate", "false_alarms", "test_good",
              "recall", "test_defects", "image_auroc", "held_out_median", "test_good_median")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{row[key]:.3g}" if isinstance(row[key], float) else str(row[key]) for key in header) + " |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        machine = f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads".strip()
        args.output.write_text(json.dumps({"machine": machine, "image_size": args.image_size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
