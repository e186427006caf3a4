"""Bare-forward throughput of the runtimes on one bundle: pre-decoded uint8 batches, img/s.

    python bench/runtime_throughput.py --weights ../shared/weights/mobilenet_v2_..._no_top.h5 \
        [--bundle DIR] [--batches 32,64] [--rounds 15]

Without --bundle it exports a MobileNetV2-224 + 120-class head (random head, ImageNet backbone
from --weights, or random if none) to a temp dir. Compares TensorFlow, OpenVINO one-infer-per-
batch (LATENCY hint) and OpenVINO AsyncInferQueue (THROUGHPUT hint), and the max |Δprob|.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export_mobilenet(weights: str | None, out: str) -> str:
    from core.breeds import STANFORD_DOGS
    from core.bundle import export_bundle
    from core.registry import create_model

    model = create_model("mobilenet_v2", len(STANFORD_DOGS), weights=weights, input_size=224)
    export_bundle(model, STANFORD_DOGS, out, input_size=224, card_extra={"backbone": "mobilenet_v2"})
    return out


def interleaved(runtimes: dict, batch: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """img/s of single calls, runtimes taking turns each round, so a busy shared machine
    slows all of them alike; the best round is the closest to an idle machine."""
    for rt in runtimes.values():
        rt.predict(batch)  # warm-up (first-call allocations)
    rates: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(rounds):
        for name, rt in runtimes.items():
            start = time.perf_counter()
            rt.predict(batch)
            rates[name].append(len(batch) / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle")
    parser.add_argument("--weights")
    parser.add_argument("--batches", default="32,64")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from core.bundle import load_bundle
    from core.runtime import load_runtime

    path = args.bundle or export_mobilenet(args.weights, os.path.join(tempfile.mkdtemp(), "bundle"))
    bundle = load_bundle(path)
    t0 = time.perf_counter()
    runtimes = {
        "tensorflow": load_runtime(bundle, "tensorflow", args.threads),
        "openvino sync (LATENCY, 1 infer/batch)": load_runtime(bundle, "openvino", args.threads, mode="sync"),
        "openvino async (THROUGHPUT, AsyncInferQueue)": load_runtime(bundle, "openvino", args.threads,
                                                                     mode="async"),
        "openvino sync bf16 (opt-in; the default is f32)": load_runtime(bundle, "openvino", args.threads,
                                                                        mode="sync", precision="bf16"),
    }
    print(f"bundle {path} ({bundle.input_size}, {bundle.num_classes} classes); load {time.perf_counter() - t0:.1f} s;"
          f" cores {os.cpu_count()}; OpenVINO precision {runtimes['openvino sync (LATENCY, 1 infer/batch)'].precision}")
    rng = np.random.default_rng(0)
    for size in (int(b) for b in args.batches.split(",")):
        batch = rng.integers(0, 256, (size, *bundle.input_size, 3), dtype=np.uint8)
        ref = runtimes["tensorflow"].predict(batch)
        rates = interleaved(runtimes, batch, args.rounds)
        for name, rt in runtimes.items():
            delta = float(np.abs(rt.predict(batch) - ref).max())
            print(f"batch {size:3d}  {name:46s} best {max(rates[name]):6.1f}  median {np.median(rates[name]):6.1f}"
                  f" img/s   max|Δprob| vs TF {delta:.1e}   (load avg {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
