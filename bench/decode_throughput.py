"""Decode + resize throughput of core.images on one core, per backend.

    taskset -c 0 python -m bench.decode_throughput ../shared/data/sample_bucket --size 224 --repeat 5

Prints img/s for: PIL full decode + resize, PIL with Image.draft (DCT scaling), and the
production path `decode_image` (simplejpeg with DCT scaling, PIL fallback).
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from core import images
from core.images import IMAGE_EXTENSIONS, decode_image


def _pil(data: bytes, size: tuple[int, int], draft: bool) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    if draft:
        scale = max(size[0] / im.height, size[1] / im.width)
        im.draft("RGB", (int(np.ceil(im.width * scale)), int(np.ceil(im.height * scale))))
    return np.asarray(images._resize(images._to_rgb(im), size, images.RESIZE_CROP))


def _rate(fn, blobs: list[bytes], repeat: int) -> float:
    fn(blobs[0])
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        for blob in blobs:
            fn(blob)
        best = max(best, len(blobs) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    blobs = [p.read_bytes() for p in sorted(args.folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    size = (args.size, args.size)
    rows = {
        "pil_full": lambda b: _pil(b, size, draft=False),
        "pil_draft": lambda b: _pil(b, size, draft=True),
        "decode_image": lambda b: decode_image(b, size=size).array,
    }
    print(f"{len(blobs)} images from {args.folder}, target {size}, best of {args.repeat}")
    for name, fn in rows.items():
        print(f"{name:>14}: {_rate(fn, blobs, args.repeat):7.1f} img/s")


if __name__ == "__main__":
    main()
