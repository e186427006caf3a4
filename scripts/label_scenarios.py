"""Try to break the label output as operations do, and print what every reader reads back.

    python scripts/label_scenarios.py [--images 40] [--work /tmp/breedlabel-scenarios]

For each scenario (concurrent starts, SIGKILL at each phase of a run, SIGTERM, SIGINT, plain
and --relabel reruns), runs the real `python -m jobs.label` in processes of their own on a local
Ray it starts, kills them at exact points of the code (tests/fixtures/crash.py), reruns, then
reads the output folder with pandas, pyarrow.dataset (plain and hive), pq.read_table and DuckDB
and prints the exit codes and, per reader, the rows and the rows per (uri, member,
content_sha256, model_id). The same scenarios are asserted in tests/test_label_integrity.py;
this prints the figures for a person. A tiny random model labels synthetic photos.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from tests.fixtures.crash import Point, job_env, label_command  # noqa: E402

KEY = ["uri", "member", "content_sha256", "model_id"]
KILLS = {
    "SIGKILL while listing": Point("core.labelling:chunk_table", nth=2, when="before"),
    "SIGKILL mid-batch (after 3 parts staged)": Point("core.output:Output.write_part", nth=3),
    "SIGKILL after the commit decision, before publishing": Point("core.output:Output._publish", when="before"),
    "SIGKILL after publishing, before releasing the lease": Point("core.lease:Lease.release", when="before"),
    "SIGTERM mid-batch": Point("core.output:Output.write_part", nth=2, action="term"),
    "SIGINT mid-batch": Point("core.output:Output.write_part", nth=2, action="int"),
}


def readers(out: Path) -> dict[str, tuple[int, int]]:
    """(rows, most rows for one key) as each reader sees the folder."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    frames = {
        "pandas": lambda: pd.read_parquet(out),
        "pyarrow.dataset": lambda: ds.dataset(out, format="parquet").to_table().to_pandas(),
        "pyarrow.dataset hive": lambda: ds.dataset(out, partitioning="hive").to_table().to_pandas(),
        "pq.read_table": lambda: pq.read_table(out).to_pandas(),
        "duckdb": lambda: duckdb.sql(f"select * from read_parquet('{out}/run_id=*/*.parquet')").df(),
    }
    got = {}
    for name, read in frames.items():
        try:
            df = read()
            got[name] = (len(df), int(df.groupby(KEY, dropna=False).size().max()) if len(df) else 0)
        except Exception as exc:  # noqa: BLE001 - a reader that fails is a finding, printed
            got[name] = (-1, -1)
            print(f"    {name} failed: {type(exc).__name__}: {str(exc)[:120]}")
    return got


def run(cmd: list[str]) -> int:
    return subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "breedlabel-scenarios"))
    args = ap.parse_args()
    from tests.fixtures.images import jpeg_bytes
    from tests.fixtures.models import make_tiny_bundle

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    photos = work / "photos"
    photos.mkdir(parents=True)
    for i in range(args.images):
        (photos / f"img{i:03d}.jpg").write_bytes(jpeg_bytes(32 + i % 7, 24 + i % 5, quality=70 + i % 20))
    bundle = work / "bundle"
    make_tiny_bundle(bundle)
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    address = ray.get_runtime_context().gcs_address

    def label_args(out: Path, *extra: str) -> list[str]:
        return [str(photos), "--model", str(bundle), "--out", str(out), "--batch-size", "4", "--rows-per-file",
                "4", "--stage-every", "0", "--actors", "1", "--cpus-per-actor", "1", "--no-progress",
                "--address", address, *extra]

    def report(name: str, codes: list[int], out: Path) -> None:
        seen = readers(out)
        cells = ", ".join(f"{r} {n} rows (max {m}/key)" for r, (n, m) in seen.items())
        print(f"{name}: exit codes {codes}; {cells}", flush=True)

    print(f"{args.images} photos; every reader should read {args.images} rows, 1 per key", flush=True)
    for i, (name, point) in enumerate(KILLS.items()):
        out = work / f"killed{i}"
        codes = [run(label_command(label_args(out), point)), run(label_command(label_args(out)))]
        report(f"{name}, then a rerun", codes, out)

    out = work / "plain"
    codes = [run(label_command(label_args(out))) for _ in range(2)]
    report("plain run, then the same command again", codes, out)

    out = work / "concurrent"
    procs = [subprocess.Popen(label_command(label_args(out)), cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    report("two runs started together on one output", codes, out)

    out, marker, go = work / "paused", work / "paused.marker", work / "paused.go"
    first = subprocess.Popen(label_command(label_args(out), Point("core.output:Output.write_part", action="pause"),
                                           marker=marker, release=go), cwd=REPO, env=job_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not marker.exists():
        time.sleep(0.1)
    second = run(label_command(label_args(out)))
    go.touch()
    report("a second run while the first is mid-run (then the first finishes)", [second, first.wait(600)], out)

    out = work / "relabel"
    codes = [run(label_command(label_args(out))), run(label_command(label_args(out, "--relabel")))]
    report("a run, then --relabel (two rows per key, by design)", codes, out)
    ray.shutdown()


if __name__ == "__main__":
    main()
