"""Print the top-k breeds of one or more images (decoded and resized as the bundle's card says).

    breedlabel predict photo.jpg other.png --model bundles/mobilenet_v2 [--top-k 3] [--json]

Exit code 0 when every image was labelled, 1 when any could not be (each such image gets one
`breedlabel predict: error: <file>: <reason>` line on stderr; the others are still printed).
"""
from __future__ import annotations

import argparse
import json
import sys

from core.errors import EXIT_FAILED, EXIT_OK
from core.options import positive_int
from core.predict import ImageResult, PredictConfig

RUNTIME_CHOICES = ("auto", "openvino", "tensorflow")


def add_runtime_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """--runtime, worded once for predict, evaluate and ui."""
    parser.add_argument("--runtime", choices=RUNTIME_CHOICES, default=default,
                        help="inference engine: auto = OpenVINO on CPU, TensorFlow on GPU")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PredictConfig()
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or URIs")
    parser.add_argument("--model", required=True, metavar="BUNDLE", help="bundle path or URI")
    parser.add_argument("--top-k", type=positive_int, default=d.top_k, help="breeds to show per image")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    add_runtime_argument(parser, d.runtime)
    parser.add_argument("--threads", type=positive_int, default=d.threads,
                        help="inference threads (default: all cores)")
    parser.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="images per inference call")


def _as_dict(result: ImageResult) -> dict:
    preds = [{"breed_id": p.breed_id, "breed": p.breed, "prob": round(p.prob, 6)} for p in result.predictions or []]
    return {"image": result.source, "top_k": preds if result.ok else None, "error": result.error,
            "width": result.width, "height": result.height,
            "dog_score": None if result.dog_score is None else round(result.dog_score, 6), "is_dog": result.is_dog}


def _print_text(result: ImageResult, display: dict[str, str]) -> None:
    print(result.source)
    if result.is_dog is False:  # the breeds below are what it would be, were it a dog
        print(f"  no dog found (dog score {result.dog_score:.2f}); the closest breeds:")
    for rank, p in enumerate(result.predictions or [], 1):
        print(f"  {rank}. {display.get(p.breed_id, p.breed):<32} {p.prob:7.2%}")


def run(args: argparse.Namespace) -> int:
    from core.predict import Predictor

    predictor = Predictor(args.model, runtime=args.runtime, threads=args.threads, batch_size=args.batch_size)
    results = predictor.predict_paths(args.images, k=args.top_k)
    display = {b.id: b.display for b in predictor.classes}
    for res in results:
        if not res.ok:
            print(f"breedlabel predict: error: {res.source}: {res.error}", file=sys.stderr)
        elif not args.json:
            _print_text(res, display)
    if args.json:
        doc = {"model_id": predictor.bundle.model_id, "runtime": predictor.runtime.name,
               "results": [_as_dict(r) for r in results]}
        print(json.dumps(doc, indent=2))
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


if __name__ == "__main__":
    from jobs.cli import main

    sys.exit(main(["predict", *sys.argv[1:]]))
