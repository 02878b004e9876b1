"""Where padim_hf's fit time goes: backbone alone, statistics collection, finalisation (random-init backbone).

    python benchmarks/profile_fit.py --backbone wide_resnet50_2 --n-features 550 --n-images 32
"""

import argparse
import time

import torch

from padim_hf import PadimConfig, PadimModel


def synthetic_batches(n_images: int, batch_size: int, size: int):
    for start in range(0, n_images, batch_size):
        generator = torch.Generator().manual_seed(start)
        yield torch.randn(min(batch_size, n_images - start), 3, size, size, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--n-features", type=int, default=550)
    parser.add_argument("--n-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()

    config = PadimConfig(backbone=args.backbone, layers=(1, 2, 3), n_features=args.n_features, image_size=args.image_size)
    model = PadimModel(config).eval()
    batches = lambda: synthetic_batches(args.n_images, args.batch_size, args.image_size)  # noqa: E731
    with torch.inference_mode():
        model.backbone(next(batches()))  # warm-up
        started = time.perf_counter()
        for batch in batches():
            model.backbone(batch)
        backbone = time.perf_counter() - started
    started = time.perf_counter()
    statistics = model.collect_statistics(batches(), allow_random_backbone=True)
    collect = time.perf_counter() - started
    started = time.perf_counter()
    model.set_gaussian(statistics, release_statistics=True)
    finalise = time.perf_counter() - started
    print(
        f"{args.backbone} C={args.n_features} N={args.n_images}: backbone {backbone:.1f} s, "
        f"collect_statistics {collect:.1f} s (backbone + embedding + accumulation), finalisation {finalise:.1f} s, "
        f"fit / backbone {(collect + finalise) / backbone:.2f}"
    )


if __name__ == "__main__":
    main()
