"""Labelling throughput, all figures in one run on one machine and one bundle (issue 8, item 9).

    python bench/label_throughput.py --bundle /work/runs/label/bench_bundle \
        [--data ../shared/data/sample_bucket] [--work /tmp/breedlabel-bench]

The photos are replicated to 20,000 files with unique bytes (a per-copy trailer after the JPEG
end marker: decoders ignore it, hashes differ), so no de-duplication can shortcut the work.
Prints (a) TensorFlow and (b) OpenVINO bare forward img/s on pre-decoded batches, (c) decode-only
img/s on one core, (d) end-to-end `breedlabel label` img/s, marginal between a 2,000- and an
8,000-file run (Ray start-up cancels out), (e) the reference one-image-at-a-time loop, (f) peak
RSS of the whole job process tree at 2k and 20k images, then (d)/(a), (d)/(e), (d)/limit with
limit = cores / (1/(c) + cores/(b)). Figures only; no assertions.

    python bench/label_throughput.py --bundle NEW --baseline OLD [--small 1000 --large 3000]

compares two bundles instead (e.g. with and without the dog score and the temperature, or two
presets, each fed at its own input size): (b) and (d) for each, measured alternately in one run,
and their ratios.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sample_bucket"


def replicate(data: Path, work: Path, total: int) -> Path:
    """`total` unique-byte copies of the photos under work/pool (made once, reused)."""
    pool = work / "pool"
    marker = pool / f".complete-{total}"
    if marker.exists():
        return pool
    sources = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    blobs = [p.read_bytes() for p in sources]
    for i in range(total):
        sub = pool / f"d{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:06d}.jpg").write_bytes(blobs[i % len(blobs)] + b"BENCH%010d" % i)
    marker.touch()
    return pool


def subset(pool: Path, work: Path, n: int) -> Path:
    """A folder of the first n pool files (hard links: no extra bytes on disk)."""
    folder = work / f"set{n}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        files = sorted(pool.rglob("img*.jpg"))[:n]
        for f in files:
            target = folder / f.parent.name / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)
        (folder / ".complete").touch()
    return folder


def batches(files: list[Path], size: tuple[int, int], n: int = 256) -> np.ndarray:
    from core.images import decode_image

    return np.stack([decode_image(f.read_bytes(), size=size).array for f in files[:n]])


def forward_rate(runtime, images: np.ndarray, batch: int = 64, seconds: float = 8.0) -> float:
    runtime.predict(images[:batch])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(images), batch):
            runtime.predict(images[i:i + batch])
            done += len(images[i:i + batch])
    return done / (time.perf_counter() - start)


def decode_rate(files: list[Path], size: tuple[int, int], policy: str) -> float:
    from core.images import decode_image

    blobs = [f.read_bytes() for f in files]
    start = time.perf_counter()
    for b in blobs:
        decode_image(b, size=size, policy=policy)
    return len(blobs) / (time.perf_counter() - start)


def reference_loop(files: list[Path], bundle, n: int = 60) -> float:
    """The reference system's script, image by image: Keras `load_img` to the input size, then
    `model.predict` on a batch of one, on a Keras model of the bundle's architecture (the
    reference kept Keras h5 weights; which weights does not change the speed)."""
    import tf_keras as keras

    from core.registry import create_model

    h, w = bundle.input_size
    model = create_model(bundle.card.get("backbone") or "mobilenet_v2", bundle.num_classes, weights=None,
                         input_size=h)
    model.predict(np.zeros((1, h, w, 3), np.float32), verbose=0)  # build + trace outside the timing
    start = time.perf_counter()
    for f in files[:n]:
        img = keras.utils.img_to_array(keras.utils.load_img(f, target_size=(h, w)))
        model.predict(img[None], verbose=0)
    return n / (time.perf_counter() - start)


def tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_label(folder: Path, bundle: str, extra: list[str]) -> tuple[float, int]:
    """Wall seconds and peak tree RSS of one `breedlabel label` process (its own local Ray)."""
    out = Path(tempfile.mkdtemp(prefix="label-bench-out-"))
    cmd = [sys.executable, "-m", "jobs.label", str(folder), "--model", bundle, "--out", str(out),
           "--no-progress", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.25)
    wall = time.perf_counter() - start
    err = proc.stderr.read()
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"label run failed ({proc.returncode}): {err[-3000:]}")
    return wall, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="a MobileNetV2-224 bundle (weights do not matter)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder of photos to replicate")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "breedlabel-bench"))
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--large", type=int, default=8000)
    ap.add_argument("--rss-large", type=int, default=20000)
    ap.add_argument("--pipelines", default="fused", help="comma list of fused,two-stage to measure for (d)")
    ap.add_argument("--label-args", default="", help="extra `breedlabel label` options, e.g. '--batch-size 32'")
    ap.add_argument("--baseline", default=None, help="a second bundle: compare (b) and (d) of --bundle against it")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the --baseline comparison")
    ap.add_argument("--forward-only", action="store_true", help="--baseline comparison of (b) only (no label runs)")
    args = ap.parse_args()
    if args.baseline:
        compare(args)
        return

    from core.bundle import load_bundle
    from core.runtime import load_runtime

    cores = os.cpu_count() or 1
    work = Path(args.work)
    pool = replicate(Path(args.data), work, max(args.large, args.rss_large))
    files = sorted(pool.rglob("img*.jpg"))
    bundle = load_bundle(args.bundle)
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.2f}; bundle {bundle.model_id[:12]} "
          f"input {bundle.input_size}, {len(bundle.classes)} classes", flush=True)
    images = batches(files, bundle.input_size)
    a = forward_rate(load_runtime(bundle, "tensorflow", threads=cores), images)
    print(f"(a) TensorFlow bare forward, batches of 64: {a:8.1f} img/s", flush=True)
    b = forward_rate(load_runtime(bundle, "openvino", threads=cores), images)
    print(f"(b) OpenVINO bare forward, batches of 64:   {b:8.1f} img/s", flush=True)
    c = decode_rate(files[:600], bundle.input_size, bundle.resize_policy)
    print(f"(c) decode + resize/crop, one core:         {c:8.1f} img/s", flush=True)
    e = reference_loop(files, bundle)
    print(f"(e) reference one-image-at-a-time loop:     {e:8.1f} img/s", flush=True)
    limit = cores / (1 / c + cores / b)
    small, large = subset(pool, work, args.small), subset(pool, work, args.large)
    d_best, rss_small = 0.0, 0
    for pipeline in args.pipelines.split(","):
        extra = ["--pipeline", pipeline, *args.label_args.split()]
        t_small, rss_small = run_label(small, args.bundle, extra)
        t_large, _ = run_label(large, args.bundle, extra)
        d = (args.large - args.small) / (t_large - t_small)
        print(f"(d) end-to-end label [{pipeline}], marginal {args.small}->{args.large}: {d:8.1f} img/s "
              f"(runs {t_small:.1f} s, {t_large:.1f} s; load {os.getloadavg()[0]:.2f})", flush=True)
        d_best = max(d_best, d)
    _, rss_large = run_label(subset(pool, work, args.rss_large), args.bundle, args.label_args.split())
    print(f"(f) peak RSS of the job tree: {rss_small / 2**20:.0f} MiB at {args.small}, "
          f"{rss_large / 2**20:.0f} MiB at {args.rss_large} (ratio {rss_large / rss_small:.2f})")
    print(f"limit = {cores} / (1/(c) + {cores}/(b)) = {limit:.1f} img/s")
    print(f"(d)/(a) = {d_best / a:.2f}   (d)/(e) = {d_best / e:.1f}   (d)/limit = {d_best / limit:.2f}   "
          f"load average now {os.getloadavg()[0]:.2f}")


def compare(args) -> None:
    """(b) and (d) of --bundle and --baseline, alternating round by round (drifts in the machine's
    speed hit both), then the medians and their ratios."""
    from core.bundle import load_bundle
    from core.runtime import load_runtime

    cores = os.cpu_count() or 1
    work = Path(args.work)
    pool = replicate(Path(args.data), work, args.large)
    files = sorted(pool.rglob("img*.jpg"))
    bundles = {"new": load_bundle(args.bundle), "baseline": load_bundle(args.baseline)}
    images = {k: batches(files, b.input_size) for k, b in bundles.items()}  # each at its own input size
    runtimes = {k: load_runtime(b, "openvino", threads=cores) for k, b in bundles.items()}
    small, large = subset(pool, work, args.small), subset(pool, work, args.large)
    forward: dict[str, list[float]] = {k: [] for k in bundles}
    label: dict[str, list[float]] = {k: [] for k in bundles}
    extra = args.label_args.split()
    for r in range(args.rounds):
        for name in (("new", "baseline") if r % 2 == 0 else ("baseline", "new")):
            forward[name].append(forward_rate(runtimes[name], images[name], seconds=5.0))
            uri = args.bundle if name == "new" else args.baseline
            if args.forward_only:
                label[name].append(float("nan"))
            else:
                t_small, _ = run_label(small, uri, extra)
                t_large, _ = run_label(large, uri, extra)
                label[name].append((args.large - args.small) / (t_large - t_small))
            print(f"round {r + 1} {name:8s}: (b) {forward[name][-1]:7.1f} img/s  (d) {label[name][-1]:7.1f} img/s "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    med = {k: (float(np.median(forward[k])), float(np.median(label[k]))) for k in bundles}
    for name, (b, d) in med.items():
        print(f"{name:8s} {bundles[name].model_id[:12]}: (b) OpenVINO forward {b:7.1f} img/s, (d) end-to-end {d:7.1f} "
              f"img/s (medians of {args.rounds})")
    print(f"new/baseline: (b) {med['new'][0] / med['baseline'][0]:.3f}  (d) {med['new'][1] / med['baseline'][1]:.3f}")


if __name__ == "__main__":
    main()
