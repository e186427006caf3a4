"""Starting fast and failing fast: checks before Ray starts, and no Ray at all for a run with
nothing to do. No module-scoped Ray here on purpose: these tests assert that none was started."""
from __future__ import annotations

import pytest

from core import output
from core.errors import BreedlabelError
from core.label_config import LabelConfig
from jobs.label import label
from tests.fixtures.images import jpeg_bytes

SMALL = dict(actors=1, cpus_per_actor=1, batch_size=4, rows_per_file=50, io_threads=2, progress=False)


@pytest.mark.slow
def test_nothing_to_do_ends_before_ray_starts(tmp_path, tiny_bundle, monkeypatch):
    """No ray_local here: the second run must not start Ray at all. Paths given relative are
    recorded absolute in the manifest."""
    import ray

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        (folder / f"p{i}.jpg").write_bytes(jpeg_bytes(40 + i, 30))
    monkeypatch.chdir(tmp_path)
    cfg = LabelConfig(inputs=("photos",), model=str(tiny_bundle), out="out", **SMALL, address="local")
    first = label(cfg)
    assert first[output.M_IMAGES] == 10 and first[output.M_STARTUP_S] > 0
    assert first[output.M_INPUTS] == [str(folder)] and first[output.M_CONFIG]["out"] == str(tmp_path / "out")
    assert not ray.is_initialized()  # the run shut down the Ray it started
    again = label(cfg)
    assert again[output.M_IMAGES] == 0 and again[output.M_SKIPPED] == 10
    assert not ray.is_initialized()


def test_a_missing_input_fails_before_ray_and_leaves_nothing(tmp_path, tiny_bundle):
    import ray

    out = tmp_path / "out"
    cfg = LabelConfig(inputs=(str(tmp_path / "no-such-folder"),), model=str(tiny_bundle), out=str(out), **SMALL)
    with pytest.raises(BreedlabelError, match="no-such-folder"):
        label(cfg)
    assert not ray.is_initialized()
    assert output.Output(str(out)).staged_runs() == [] and not (out / "_lease.json").exists()
