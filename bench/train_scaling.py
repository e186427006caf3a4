"""Training throughput over 1 and N Ray Train workers on the same data; prints the scaling efficiency.

Each configuration trains `--epochs` head epochs with the same global batch (each worker
steps on global/N images of its own shard); the first epoch (decode + cache + graph tracing)
is left out and the median of the rest is kept. Efficiency(N) = img/s(N) / (N x img/s(1)).
    python -m bench.train_scaling --data ../shared/data/stanford_dogs_train --classes 12 \
        --preset mobilenet_v2 --weights ../shared/weights/mobilenet_v2_..._no_top.h5 --input-size 128
On a GPU machine add --gpus-per-worker 1 (and --workers 1,2,... up to the GPUs there).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def measure(cfg, data: str, workers: int, args, storage: str) -> dict:
    from jobs.train_distributed import DistributedConfig, make_trainer

    dist = DistributedConfig(workers=workers, cpus_per_worker=args.cpus_per_worker,
                             gpus_per_worker=args.gpus_per_worker, storage=storage,
                             run_name=f"scaling-{workers}w-{int(time.time())}", keep_checkpoints=args.epochs + 1)
    t0 = time.time()
    result = make_trainer(cfg, data, dist).fit()
    if result.error:
        raise SystemExit(f"{workers} worker(s) failed: {result.error}")
    df = result.metrics_dataframe.sort_values("epoch")
    steady = df[df["epoch"] >= 1]["images_per_s"].tolist() or df["images_per_s"].tolist()
    ips = statistics.median(steady)
    return {"workers": workers, "images_per_s": round(ips, 1), "per_worker": round(ips / workers, 1),
            "epoch_train_s": [round(x, 2) for x in df["train_s"]], "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    from core.config import get_preset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--preset", default="smoke")
    p.add_argument("--weights", default=None)
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, the same for every N")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    args = p.parse_args()

    import ray

    cfg = get_preset(args.preset).replace(classes=args.classes, head_epochs=args.epochs, finetune_epochs=0,
                                          batch_size=args.batch_size, head_feature_views=0,
                                          early_stopping_patience=args.epochs + 1)
    if args.weights:
        cfg = cfg.replace(weights=None if args.weights == "none" else args.weights)
    if args.input_size:
        cfg = cfg.replace(input_size=args.input_size)
    ray.init(include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="train-scaling-")
    rows = [measure(cfg, args.data, int(n), args, storage) for n in args.workers.split(",")]
    base = rows[0]["images_per_s"] / rows[0]["workers"]
    for row in rows:
        row["efficiency"] = round(row["images_per_s"] / (row["workers"] * base), 3)
        print(json.dumps(row))
    print(f"{cfg.backbone} @ {cfg.input_size or 'native'} px, global batch {cfg.batch_size}: " + ", ".join(
        f"{r['workers']} worker(s) {r['images_per_s']} img/s ({r['per_worker']}/worker, "
        f"efficiency {r['efficiency']:.0%})" for r in rows))
    ray.shutdown()


if __name__ == "__main__":
    main()
