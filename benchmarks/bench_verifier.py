"""Throughput of the toy-world verifier (images per second), as used inside training loops.

    python benchmarks/bench_verifier.py            # 2,000 renders per size, 3 repeats
    python benchmarks/bench_verifier.py --quick    # a few seconds (do not commit its results)

Renders are made once, outside the timed region; the timed loop calls ``verify(image, metadata)`` on
PIL images, as the verifier reward does. Writes ``benchmarks/results/verifier.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import scipy
from PIL import Image, ImageFilter

from trl_intrinsic.toyworld import evaluate, render, sample_metadata, verify


def machine_info() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pillow": PIL.__version__,
    }


def _blur_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mild degradation like a generator's output: Gaussian blur (radius 0.6 at 32 px) and pixel noise σ = 9."""
    radius = 0.6 * image.size[0] / 32
    arr = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    arr = arr + rng.normal(0.0, 9.0, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def bench_size(size: int, n: int, repeats: int, seed: int, condition: str) -> dict[str, float]:
    metas = sample_metadata(n, seed=seed)
    images = [render(m, seed=i, size=size) for i, m in enumerate(metas)]
    if condition == "blur+noise":
        rng = np.random.default_rng(seed)
        images = [_blur_noise(image, rng) for image in images]
    verify(images[0], metas[0])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for image, meta in zip(images, metas):
            verify(image, meta)
        times.append(time.perf_counter() - start)
    best, median = min(times), float(np.median(times))
    accuracy = evaluate(images, metas)["overall"]
    return {
        "condition": condition,
        "size": size,
        "n": n,
        "repeats": repeats,
        "images_per_s_best": n / best,
        "images_per_s_median": n / median,
        "ms_per_image_median": 1000 * median / n,
        "accuracy": accuracy,
    }


def to_markdown(result: dict) -> str:
    info = result["machine"]
    lines = [
        "# Toy-world verifier throughput",
        "",
        f"`verify(image, metadata)` on renders of balanced prompts (clean, and blurred with pixel noise), {result['rows'][0]['repeats']} repeats"
        + (" (quick run)" if result["quick"] else "")
        + ".",
        "",
        "| images | size (px) | n | images/s (median) | images/s (best) | ms/image | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['condition']} | {row['size']} | {row['n']} | {row['images_per_s_median']:.0f} | {row['images_per_s_best']:.0f} "
            f"| {row['ms_per_image_median']:.3f} | {row['accuracy']:.3f} |"
        )
    lines += [
        "",
        f"Machine: {info['platform']}, {info['processor']}, {info['cpu_count']} CPUs; Python {info['python']}, "
        f"numpy {info['numpy']}, scipy {info['scipy']}, Pillow {info['pillow']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="renders per size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="200 renders, one repeat")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    n, repeats = (200, 1) if args.quick else (args.n, args.repeats)

    rows = [
        bench_size(size, n, repeats, args.seed, condition)
        for condition in ("render", "blur+noise")
        for size in args.sizes
    ]
    result = {"quick": args.quick, "machine": machine_info(), "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "verifier.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    (args.out_dir / "verifier.md").write_text(markdown)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
