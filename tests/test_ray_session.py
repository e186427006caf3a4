"""jobs.ray_session without a cluster: what a quiet driver does with the cluster's messages."""
from __future__ import annotations

import logging

from jobs import ray_session


def test_the_clusters_messages_go_to_the_log_not_stdout(monkeypatch, capsys, caplog):
    """Ray's driver printed "(raylet) Task MapWorker(MapBatches(LabelActor)).submit failed. There are
    infinite retries remaining …" on stdout, with colour codes, when a label run was stopped: noise in
    the stream scripts read, from a command that prints nothing there."""
    from ray._private import worker

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # put back after the test
    ray_session.cluster_messages_to_log()
    ray_session.cluster_messages_to_log()  # twice: wrapped once
    caplog.set_level(logging.DEBUG, logger="jobs.ray_session")
    message = "Task MapWorker(MapBatches(LabelActor)).submit failed. There are infinite retries remaining"
    worker.print_to_stdstream({"lines": [message], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records] == [f"(raylet) {message}"]
    worker.print_to_stdstream({"lines": ["a worker's own line"], "pid": 1234, "ip": "127.0.0.1", "is_err": False,
                               "task_name": "t", "actor_name": "", "job": "01000000"}, ignore_prefix=True)
    assert "a worker's own line" in capsys.readouterr().out  # what log_to_driver shows is left as it is
