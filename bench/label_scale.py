"""Scheduled runs at bucket scale: listing, skip-set and no-op figures, all in one run (issue 15).

    python bench/label_scale.py [--objects 100000] [--manifest-lines 1000000] [--new 1000]
                                [--bundle BUNDLE] [--work /tmp/breedlabel-scale]

Prints
(a) listing + skip-set rate (objects/s) over a `--manifest-lines` S3 Inventory Parquet file whose
    objects a finished run already labelled: load of the run's `_keys.npz` and the listing that
    judges every line from its ETag (nothing left to label); plus the skip-set's bytes per key and
    the rate of building keys from Parquet rows (outputs written before `_keys.npz` existed);
(b) an incremental no-op `breedlabel label s3://…/photos/` over `--objects` keys on a local
    moto_server, all labelled by a finished run: wall time, the time to list the prefix alone,
    and the object-body GETs the run made, counted in the server's request log (must be 0);
(c) `--new` new photos uploaded under the same prefix: the GETs of the next run (only those);
(d) the driver's writer rate (rows/s through LabelRun.add: stats, keys, Parquet staging);
(e) peak RSS of the job's process tree at 10^5 and 10^6 rows of output history;
(f) start-up to the first labelled rows (the manifest's startup_s) of run (c).
The finished history of (a), (b) and (e) is written through the project's own writer and key
log (core.output, core.skipset) from rows made up for the listed objects: labelling 10^5–10^6
images on a 2-core machine would take hours and measures nothing these figures are about.
Figures only; no assertions. The tiny test model labels (c) unless --bundle is given.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench.label_throughput import tree_rss  # noqa: E402
from core import output, schema, storage  # noqa: E402
from core.label_config import LabelConfig  # noqa: E402
from core.label_run import LabelRun  # noqa: E402
from core.labelling import SKIPPED  # noqa: E402
from core.sources import iter_label_items  # noqa: E402

BUCKET = "scale-bench"
CLASSES = (["n0"], ["c"])


def _rows(uris: list[str], versions: list[str | None], model_id: str) -> pa.Table:
    n = len(uris)
    return schema.build_table(
        uris=uris, members=[None] * n, sizes=[1000] * n,
        sha256s=[hashlib.sha256(u.encode()).hexdigest() for u in uris], widths=[64] * n, heights=[48] * n,
        probs=np.ones((n, 1), np.float32), labelled=np.ones(n, bool), errors=[None] * n,
        class_ids=CLASSES[0], class_names=CLASSES[1], model_id=model_id, k=1, versions=versions)


def write_history(out_uri: str, uris: list[str], versions: list[str | None], model_id: str) -> float:
    """One finished run holding these objects, through the real writer, key log and commit."""
    start = time.perf_counter()
    out = output.Output(out_uri)
    run = LabelRun(out, LabelConfig(inputs=("history",), model="bench", out=out_uri, rows_per_file=200_000,
                                    stage_every_s=1e9), model_id, None, output.new_run_id(), 0, [])
    for i in range(0, len(uris), 50_000):
        rows = _rows(uris[i:i + 50_000], versions[i:i + 50_000], model_id)
        run.add(rows.append_column(SKIPPED, pa.array(np.zeros(rows.num_rows, bool))))
    run.commit(None)
    return time.perf_counter() - start


# --- (a) ------------------------------------------------------------------------------------

def figure_a(work: Path, lines: int) -> None:
    model_id = "a" * 64
    keys = [f"photos/{i // 1000:05d}/img_{i:08d}.jpg" for i in range(lines)]
    etags = [f"{i:032x}" for i in range(lines)]
    inventory = work / "inventory.parquet"
    pq.write_table(pa.table({"bucket": [BUCKET] * lines, "key": keys, "size": [1000] * lines, "e_tag": etags}),
                   inventory)
    out_uri = str(work / "a_out")
    shutil.rmtree(out_uri, ignore_errors=True)
    write_history(out_uri, [f"s3://{BUCKET}/{k}" for k in keys], etags, model_id)
    out = output.Output(out_uri)
    t0 = time.perf_counter()
    cfg = LabelConfig(manifests=(str(inventory),), model="bench", out=out_uri)
    run = LabelRun.start(out, cfg, model_id, None)
    t_keys = time.perf_counter() - t0
    t0 = time.perf_counter()
    left = sum(1 for _ in iter_label_items([], [str(inventory)], keep=run.keep))
    t_list = time.perf_counter() - t0
    run.abandon()
    files = [out.path(f) for m in out.finished_runs() for f in m[output.M_FILES]]
    t0 = time.perf_counter()
    built = out.parts_keys(files)
    t_build = time.perf_counter() - t0
    per_key = run.skipset.nbytes / (len(run.skipset.content) + len(run.skipset.listing))
    print(f"(a) listing + skip-set, {lines:,}-line S3 Inventory manifest, all labelled before: "
          f"{lines / t_list:,.0f} objects/s ({t_list:.1f} s, {left} left to label); skip-set loaded from "
          f"_keys.npz in {t_keys:.2f} s, {run.skipset.nbytes / 2**20:.1f} MiB ({per_key:.0f} bytes a key, "
          f"{len(run.skipset.content):,} content + {len(run.skipset.listing):,} listing keys); "
          f"keys built from Parquet rows (no _keys.npz): {len(built.content) / t_build:,.0f} rows/s", flush=True)


# --- moto ----------------------------------------------------------------------------------

def start_moto(work: Path) -> tuple[subprocess.Popen, str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = work / "moto.log"
    script = Path(sys.executable).with_name("moto_server")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    with open(log, "wb") as sink:
        proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_REGION="us-east-1", AWS_ENDPOINT_URL=url, AWS_EC2_METADATA_DISABLED="true")
    return proc, url, log


def body_gets(log: Path, prefix: str) -> int:
    """GETs of object bodies under `prefix`, from the server's request log."""
    needle = f"GET /{BUCKET}/{prefix}"
    return sum(line.count(needle) for line in log.read_text(errors="replace").splitlines())


def put_many(client, items: list[tuple[str, bytes]]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), items))


def run_label(args: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS of the job's process tree, stderr of one `python -m jobs.label` run."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.label", *args, "--no-progress"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"label run failed ({proc.returncode}): {err[-3000:]}")
    return time.perf_counter() - start, peak, err


def figures_bc(work: Path, objects: int, new: int, bundle: str) -> None:
    import boto3

    from tests.fixtures.images import jpeg_bytes

    proc, url, log = start_moto(work)
    try:
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                              config=Config(max_pool_connections=32))
        client.create_bucket(Bucket=BUCKET)
        t0 = time.perf_counter()
        put_many(client, [(f"photos/{i // 1000:04d}/p{i:07d}.jpg", b"%07d" % i) for i in range(objects)])
        print(f"    ({objects:,} objects put to moto_server in {time.perf_counter() - t0:.0f} s)", flush=True)
        prefix = f"s3://{BUCKET}/photos/"
        t0 = time.perf_counter()
        listed = list(storage.list_files(prefix))
        t_list = time.perf_counter() - t0
        out_uri = f"s3://{BUCKET}/labels"
        write_history(out_uri, [i.uri for i in listed], [i.version for i in listed],
                      json.loads(Path(bundle, "card.json").read_text())["model_id"])
        before = body_gets(log, "photos/")
        wall, _, _ = run_label([prefix, "--model", bundle, "--out", out_uri])
        gets = body_gets(log, "photos/") - before
        last = output.Output(out_uri).last_run()
        print(f"(b) incremental no-op over {objects:,} labelled objects on S3: wall {wall:.1f} s, listing the "
              f"prefix alone {t_list:.1f} s (ratio {wall / t_list:.2f}); object-body GETs {gets}; "
              f"skipped {last[output.M_SKIPPED]:,}, Ray started: {last[output.M_CONFIG]['plan'] is not None}",
              flush=True)
        put_many(client, [(f"photos/new/n{i:05d}.jpg", jpeg_bytes(48 + i % 16, 40 + i % 9, quality=80 + i % 15))
                          for i in range(new)])
        before = body_gets(log, "photos/")
        wall, _, _ = run_label([prefix, "--model", bundle, "--out", out_uri])
        gets = body_gets(log, "photos/") - before
        m = output.Output(out_uri).last_run()
        print(f"(c) {objects:,} labelled + {new:,} new: object-body GETs {gets} (new: {new}); labelled "
              f"{m[output.M_IMAGES]:,}, skipped {m[output.M_SKIPPED]:,}, wall {wall:.1f} s", flush=True)
        print(f"(f) start-up to the first labelled rows (run c): {m[output.M_STARTUP_S]:.1f} s; labelling rate "
              f"after it {m[output.M_IMG_PER_S]:.1f} img/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- (d), (e) ------------------------------------------------------------------------------

def figure_d(work: Path, rows: int = 200_000) -> None:
    out_uri = str(work / "d_out")
    shutil.rmtree(out_uri, ignore_errors=True)
    run = LabelRun(output.Output(out_uri), LabelConfig(inputs=("x",), model="m", out=out_uri), "d" * 64, None,
                   output.new_run_id(), 0, [])
    tables = [_rows([f"s3://b/d/{i:08d}.jpg" for i in range(s, s + 64)], [f"{s:x}"] * 64, "d" * 64)
              for s in range(0, rows, 64)]
    tables = [t.append_column(SKIPPED, pa.array(np.zeros(t.num_rows, bool))) for t in tables]
    t0 = time.perf_counter()
    for t in tables:
        run.add(t)
    run.stage()
    elapsed = time.perf_counter() - t0
    print(f"(d) driver writer: {rows / elapsed:,.0f} rows/s (64-row chunks through LabelRun.add: stats, keys, "
          f"Parquet staging every {run.cfg.rows_per_file:,} rows)", flush=True)


def figure_e(work: Path, bundle: str, sizes: tuple[int, ...] = (100_000, 1_000_000)) -> None:
    from tests.fixtures.images import jpeg_bytes

    model_id = json.loads(Path(bundle, "card.json").read_text())["model_id"]
    photos = work / "e_photos"
    photos.mkdir(exist_ok=True)
    for i in range(100):
        (photos / f"p{i:03d}.jpg").write_bytes(jpeg_bytes(48 + i % 16, 40))
    peaks = {}
    for n in sizes:
        out_uri = str(work / f"e_out_{n}")
        shutil.rmtree(out_uri, ignore_errors=True)
        write_history(out_uri, [f"s3://{BUCKET}/h/{i:08d}.jpg" for i in range(n)], [f"{i:x}" for i in range(n)],
                      model_id)
        _, peaks[n], _ = run_label([str(photos), "--model", bundle, "--out", out_uri])
    a, b = sizes
    growth = (peaks[b] - peaks[a]) / ((b - a) / 1e6)
    print(f"(e) peak RSS of the job tree (100 new photos, local Ray): {peaks[a] / 2**20:.0f} MiB with {a:,} rows of "
          f"history, {peaks[b] / 2**20:.0f} MiB with {b:,} ({growth / 2**20:+.0f} MiB per million rows)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--manifest-lines", type=int, default=1_000_000)
    ap.add_argument("--new", type=int, default=1000)
    ap.add_argument("--bundle", default=None, help="bundle for (c) and (e); default: the tiny test model")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "breedlabel-scale"))
    ap.add_argument("--only", default="abcde", help="which figures to measure, e.g. 'ad'")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle
    if bundle is None and set(args.only) & set("bce"):
        from tests.fixtures.models import make_tiny_bundle

        bundle = str(work / "tiny_bundle")
        if not Path(bundle, "card.json").exists():
            shutil.rmtree(bundle, ignore_errors=True)
            make_tiny_bundle(bundle)
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "avx2") if f in Path("/proc/cpuinfo").read_text()]
    print(f"machine: {os.cpu_count()} cores ({', '.join(flags)}), load average {os.getloadavg()[0]:.2f}", flush=True)
    if "a" in args.only:
        figure_a(work, args.manifest_lines)
    if "b" in args.only or "c" in args.only:
        figures_bc(work, args.objects, args.new, bundle)
    if "d" in args.only:
        figure_d(work)
    if "e" in args.only:
        figure_e(work, bundle)
    print(f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
