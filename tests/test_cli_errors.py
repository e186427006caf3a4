"""Mistakes a user makes on the command line end in one line and an exit code, never a traceback:
bad option values (exit 2, from argparse), a UI port or host that cannot be listened on (exit 1),
stdout's reader going away (exit 1, nothing printed)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.test_predict_cli import REPO, _error_lines, breedlabel


@pytest.mark.parametrize("args, flag", [
    (["predict", "x.jpg", "--threads", "-1"], "--threads"),
    (["predict", "x.jpg", "--threads", "0"], "--threads"),
    (["predict", "x.jpg", "--batch-size", "0"], "--batch-size"),
    (["predict", "x.jpg", "--batch-size", "-3"], "--batch-size"),
    (["predict", "x.jpg", "--top-k", "0"], "--top-k"),
    (["ui", "--threads", "-1"], "--threads"),
    (["ui", "--port", "99999"], "--port"),
    (["ui", "--port", "0"], "--port"),
    (["ui", "--max-upload", "lots"], "--max-upload"),
])
def test_bad_option_values_are_usage_errors(args, flag, tmp_path):
    proc = breedlabel(*args, "--model", str(tmp_path / "not-loaded"), cache=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert line.startswith(f"breedlabel {args[0]}: error: argument {flag}: ") and "Traceback" not in proc.stderr


def test_max_upload_names_the_accepted_form(tmp_path):
    proc = breedlabel("ui", "--model", str(tmp_path), "--max-upload", "lots", cache=tmp_path)
    assert "50mb" in proc.stderr and "kb, mb, gb" in proc.stderr


def test_evaluate_counts_are_checked_when_parsing(tiny_bundle, tmp_path):
    for option, value in (("--threads", "-1"), ("--batch-size", "0")):
        proc = breedlabel("evaluate", "--model", str(tiny_bundle), "--data", str(tmp_path), option, value,
                          cache=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert _error_lines(proc.stderr)[-1] == (f"breedlabel evaluate: error: argument {option}: {value}: give a "
                                                 "whole number, at least 1")


def test_ui_on_a_busy_port_says_so(tiny_bundle, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = breedlabel("ui", "--model", str(tiny_bundle), "--port", str(port), cache=tmp_path)
    assert proc.returncode == 1
    assert _error_lines(proc.stderr) == [f"breedlabel ui: error: --port {port}: already in use on 127.0.0.1; "
                                         "pass --port N with a free port"]
    assert "Traceback" not in proc.stderr


def test_ui_on_an_address_of_another_machine_says_so(tiny_bundle, tmp_path):
    proc = breedlabel("ui", "--model", str(tiny_bundle), "--host", "192.0.2.1", cache=tmp_path)  # TEST-NET-1
    assert proc.returncode == 1
    (line,) = _error_lines(proc.stderr)
    assert line.startswith("breedlabel ui: error: --host 192.0.2.1: cannot listen on this address")
    assert "127.0.0.1" in line and "Traceback" not in proc.stderr


def test_stdout_reader_gone_is_quiet(tiny_bundle, image_factory, tmp_path):
    """`breedlabel predict … | head -1`: the reader closes the pipe; no BrokenPipeError traceback."""
    photo = str(image_factory.file("jpeg"))
    env = dict(os.environ, BREEDLABEL_CACHE=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "predict", photo, photo, "--model", str(tiny_bundle)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before it prints: its first write finds no reader
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 1
    assert stderr == "", stderr


_RAY_CLIENT = ("the label job cannot run over Ray Client (ray://): Ray Data needs a driver on the cluster. Submit it "
               "instead (`breedlabel submit label … --address http://HEAD:8265`), or run it on a cluster node with "
               "--address HEAD:6379")
_JOB_API = ("that is a job API (dashboard) address, which a Ray driver does not join; give the cluster's GCS address "
            "(HEAD:6379, or auto on one of its nodes), or run it on the cluster with `breedlabel submit … --address "
            "http://127.0.0.1:1`")


@pytest.mark.parametrize("given", ["--address", "RAY_ADDRESS"])
@pytest.mark.parametrize("address, why", [("ray://127.0.0.1:1", _RAY_CLIENT), ("http://127.0.0.1:1", _JOB_API)],
                         ids=["ray-client", "job-api"])
def test_label_at_an_address_no_driver_joins_is_a_usage_error(tmp_path, given, address, why):
    """Ray Data cannot run from a Ray Client driver: `label --address ray://HEAD:10001` listed the
    inputs, took the lease, then died in Ray Data with "'Worker' object has no attribute
    'core_worker'" and a traceback. The job API's http:// address (what `submit` takes, and a
    RAY_ADDRESS exported for it) died in ray.init with a 30-line ValueError traceback. Both are
    refused before anything starts, saying what to do instead."""
    (tmp_path / "in").mkdir()
    args = ["label", str(tmp_path / "in"), "--model", str(tmp_path / "no-bundle"), "--out", str(tmp_path / "out")]
    if given == "--address":
        proc = breedlabel(*args, "--address", address, cache=tmp_path)
    else:
        env = dict(os.environ, BREEDLABEL_CACHE=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3", RAY_ADDRESS=address)
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc.stderr) == [f"breedlabel label: error: {given} {address}: {why}"], proc.stderr
    assert not (tmp_path / "out").exists()


def test_distributed_training_at_a_job_api_address_is_a_usage_error(tmp_path):
    env = dict(os.environ, BREEDLABEL_CACHE=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3", RAY_ADDRESS="http://127.0.0.1:1")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--data", str(tmp_path), "--out",
                           str(tmp_path / "b"), "--workers", "2", "--backbone", "custom_cnn", "--weights", "none"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc.stderr) == [f"breedlabel train: error: RAY_ADDRESS http://127.0.0.1:1: {_JOB_API}"]


def test_a_mistyped_option_is_the_commands_error_with_the_option_meant(tmp_path):
    """It printed the top-level usage (`breedlabel [-h] [-v] [--version] COMMAND ...`) and no hint."""
    proc = breedlabel("label", str(tmp_path), "--model", "m", "--out", "o", "--bach-size", "3", cache=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: breedlabel label ")
    assert _error_lines(proc.stderr)[-1] == ("breedlabel label: error: unrecognized arguments: --bach-size (did you "
                                             "mean --batch-size?) 3")
    proc = breedlabel("predict", "x.jpg", "--model", "m", "--nonsense", cache=tmp_path)
    assert proc.returncode == 2 and _error_lines(proc.stderr)[-1] == (
        "breedlabel predict: error: unrecognized arguments: --nonsense")


def test_a_list_piped_in_is_a_manifest_and_submit_says_it_cannot_send_one(tiny_bundle, image_factory, tmp_path):
    """`find … | breedlabel label --manifest - …` was "/cwd/-: unknown manifest type"; a submitted
    job has no standard input of this host, so submit refuses `-` before sending anything."""
    photos = [str(image_factory.file("jpeg", name=f"p{i}.jpg")) for i in range(2)]
    env = dict(os.environ, BREEDLABEL_CACHE=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "label", "--manifest", "-", "--model", str(tiny_bundle),
                           "--dry-run"], input="\n".join(photos) + "\n", cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(photos) and "dry run: 2 inputs" in proc.stderr
    proc = breedlabel("submit", "label", "--manifest", "-", "--model", str(tiny_bundle), "--out", str(tmp_path / "o"),
                      "--address", "http://127.0.0.1:1", cache=tmp_path)
    assert proc.returncode == 2 and "--manifest -: a submitted job does not read this host's standard input" \
        in proc.stderr, proc.stderr
