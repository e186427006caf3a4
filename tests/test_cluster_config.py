"""ray_cluster.yaml against Ray's own schema; schedule recipes name real entry points; submit's
option handling and exit-code mapping (no cluster needed: fake job infos, real manifests)."""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs import cluster_check as check
from cluster import runtime_env
from cluster import submit as cluster_submit
from core.errors import ConfigError, JobError, StorageError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_cluster_yaml_validates_against_the_schema_inside_ray(cluster_config):
    schema_path = check.ray_schema_path()
    assert schema_path.is_file() and schema_path.parent.name == "autoscaler" and schema_path.parent.parent.name == "ray"
    jsonschema.validate(cluster_config, json.loads(schema_path.read_text()))
    assert check.check_cluster_config(REPO / "ray_cluster.yaml") == []


def test_cluster_yaml_shape(cluster_config):
    types = cluster_config["available_node_types"]
    head = cluster_config["head_node_type"]
    assert "GPU" not in types[head]["resources"] and "g5" not in types[head]["node_config"]["InstanceType"]
    gpu = {n: t for n, t in types.items() if n != head}
    assert {t["node_config"]["InstanceType"] for t in gpu.values()} >= {"g5.2xlarge", "g5.12xlarge"}
    assert all(t["min_workers"] == 0 for t in gpu.values())
    assert cluster_config["idle_timeout_minutes"] > 0
    assert any("breedlabel" in c and "pip install" in c for c in cluster_config["setup_commands"])
    assert "." in cluster_config["file_mounts"].values()
    assert all("IamInstanceProfile" in t["node_config"] for t in gpu.values())


@pytest.mark.parametrize("mutate, expect", [
    (lambda c: c["available_node_types"]["gpu_1x"].update(min_workers="zero"), "not of type 'integer'"),
    (lambda c: c.update(bogus_key=1), "Additional properties"),
    (lambda c: c["available_node_types"]["gpu_1x"].update(min_workers=2), "min_workers must be 0"),
    (lambda c: c.update(idle_timeout_minutes=0), "idle_timeout_minutes"),
    (lambda c: c.update(setup_commands=["echo hi"]), "install breedlabel"),
    (lambda c: c["provider"].update(aws_secret_access_key="abc"), "credentials"),
])
def test_check_catches_broken_configs(tmp_path, cluster_config, mutate, expect):
    broken = copy.deepcopy(cluster_config)
    mutate(broken)
    path = tmp_path / "ray_cluster.yaml"
    path.write_text(yaml.safe_dump(broken))
    problems = check.check_cluster_config(path)
    assert any(expect in p for p in problems), problems


def test_schedules_parse_and_name_existing_entry_points():
    assert check.check_schedules() == []
    names = {p.name for p in check.SCHEDULES_DIR.iterdir()}
    assert {"crontab", "cronjob.yaml", "rayjob.yaml"} <= names
    cron = [c for c in check.commands_in(check.SCHEDULES_DIR / "crontab")]
    assert any("breedlabel" in c and "submit" in c and "--incremental" in c for c in cron)


def test_the_check_prints_problems_only(capfd):
    """Ray's "setting max workers for head node type to 0" came through on every run (its logger's
    handler holds the real stderr, past the redirect)."""
    import logging

    logging.basicConfig()  # a root handler, as a user's logging setup would have
    assert check.main([]) == 0
    out, err = capfd.readouterr()
    assert out == "" and err == "cluster_check: 0 problem(s)\n", err


def test_schedule_lines_as_cron_and_flock_write_them(tmp_path):
    """`@hourly` has one time field, not five (a valid line was 'not a breedlabel entry point'), and
    flock's `-E 75` takes a value (it was read as the lock file); a config that is not there or
    not YAML is one line, not a traceback."""
    (tmp_path / "crontab").write_text(
        "@hourly flock -n -E 75 /tmp/l breedlabel submit label s3://b/in --model s3://b/m --out s3://b/o --wait\n"
        "5 * * * * flock -w 10 /tmp/l breedlabel submit label s3://b/in --model s3://b/m --out s3://b/o --bogus\n")
    problems = check.check_schedules(tmp_path)
    assert len(problems) == 1 and "unrecognized arguments: --bogus" in problems[0], problems
    assert check.check_cluster_config(tmp_path / "nope.yaml") == [f"{tmp_path}/nope.yaml: cannot read it "
                                                                  "(No such file or directory)"]
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    (problem,) = check.check_cluster_config(tmp_path / "bad.yaml")
    assert problem.startswith("bad.yaml: does not parse: ") and "\n" not in problem


def test_kubernetes_manifests(tmp_path):
    (cronjob,) = check.load_yaml_docs(check.SCHEDULES_DIR / "cronjob.yaml")
    assert cronjob["kind"] == "CronJob" and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["breedlabel"] and container["args"][:2] == ["submit", "label"]
    assert "--incremental" in container["args"] and "--wait" in container["args"]
    (rayjob,) = check.load_yaml_docs(check.SCHEDULES_DIR / "rayjob.yaml")
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"] == "ray.io/v1"
    entry = rayjob["spec"]["entrypoint"]
    assert entry.startswith("python -m jobs.label") and "--out" in entry  # the label job holds the lease itself
    for doc in (cronjob, rayjob):
        assert "AWS_SECRET" not in yaml.safe_dump(doc)


@pytest.mark.parametrize("argv, expect", [
    (["breedlabel", "sumbit", "label"], "no such subcommand"),
    (["python", "-m", "jobs.lable", "x"], "no such module"),
    (["breedlabel", "submit", "label", "s3://b/in", "--model", "s3://b/m", "--out", "s3://b/o",
      "--incremantal"], "unrecognized arguments"),
    (["python", "-m", "jobs.label", "s3://b/in", "--out", "s3://b/o"], "--model"),
    (["curl", "http://x"], "not a breedlabel entry point"),
])
def test_check_catches_bad_commands(argv, expect):
    problems = check.check_command(argv)
    assert any(expect in p for p in problems), problems


# --- submit: options, entrypoint, runtime env --------------------------------------------------

def _submit_args(argv: list[str]):
    from jobs import submit as submit_cli

    parser = argparse.ArgumentParser()
    submit_cli.add_arguments(parser)
    ns = parser.parse_args(argv)
    return ns, submit_cli.split_args(ns)


def test_submit_options_anywhere_job_options_pass_through(tmp_path):
    ns, job_args = _submit_args(["label", "/data/in", "--model", "/m", "--out", "/o", "--incremental",
                                 "--address", "http://h:8265", "--wait", "--env", "A=1", "--", "--address", "auto"])
    assert ns.address == "http://h:8265" and ns.wait and ns.env == ["A=1"]
    assert job_args == ["/data/in", "--model", "/m", "--out", "/o", "--incremental", "--address", "auto"]


def test_a_label_job_over_ray_client_is_refused_before_submitting():
    """A label job given `--address ray://…` fails on the cluster after its listing (Ray Data has no
    Ray Client support): refused here, saying to leave the job's own address out."""
    from jobs import submit as submit_cli

    ns, job_args = _submit_args(["label", "/data/in", "--model", "/m", "--out", "/o", "--address", "http://h:8265",
                                 "--", "--address", "ray://h:10001"])
    with pytest.raises(ConfigError, match=r"^--address ray://h:10001: the label job cannot run over Ray Client .*"
                                          r"Leave the job's --address out"):
        submit_cli.build_request(ns, job_args)


def test_entrypoint_is_the_job_module():
    """No wrapper: the label job takes its output's lease itself (--lease-ttl is its own option)."""
    job_args = ("/in", "--out", "/o", "--model", "/m", "--lease-ttl", "120")
    req = cluster_submit.JobRequest(kind="label", job_args=job_args, runtime_env={}, output="/o")
    entry = cluster_submit.build_entrypoint(req)
    assert cluster_submit.shown_entrypoint(entry) == "python -m jobs.label /in --out /o --model /m --lease-ttl 120"
    assert entry.startswith(cluster_submit.RAY_PYTHON)
    train = cluster_submit.JobRequest(kind="train", job_args=("--workers", "2"), runtime_env={})
    assert cluster_submit.shown_entrypoint(cluster_submit.build_entrypoint(train)) == "python -m jobs.train --workers 2"


@pytest.mark.parametrize("kind", sorted(cluster_submit.ENTRYPOINT_MODULES))
def test_every_entrypoint_module_runs_as_a_script(kind):
    """`python -m jobs.<kind>` is what a submitted job runs: it must be the command, not a no-op."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", cluster_submit.ENTRYPOINT_MODULES[kind], "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout and "--out" in proc.stdout, proc.stderr[-2000:]


_RAYLET = ("import subprocess, sys; "
           "sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]]).returncode)")
_SUPERVISOR = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1], shell=True).returncode)"


@pytest.mark.parametrize("raylet_flag, expect", [(True, "ray's python"), (False, "python on PATH")])
def test_entrypoint_runs_the_python_ray_runs(tmp_path, raylet_flag, expect):
    """As on a head started as `/venv/bin/ray start` with the venv off PATH: the entrypoint's shell
    (child of a JobSupervisor, child of the raylet) runs the raylet's --python_worker_command;
    without one it falls back to `python` on PATH."""
    import os
    import subprocess
    import sys

    def fake_python(folder, says: str):
        folder.mkdir()
        (folder / "python").write_text(f'#!/bin/sh\necho "{says}: $*"\n')
        (folder / "python").chmod(0o755)
        return folder / "python"

    ray_python = fake_python(tmp_path / "venv", "ray's python")
    fake_python(tmp_path / "path", "python on PATH")
    flag = f"--python_worker_command={ray_python} /ray/_private/workers/setup_worker.py" if raylet_flag else "--x"
    request = cluster_submit.JobRequest(kind="train", job_args=("--workers", "2"), runtime_env={})
    entry = cluster_submit.build_entrypoint(request)
    env = dict(os.environ, PATH=f"{tmp_path / 'path'}{os.pathsep}{os.environ['PATH']}")
    raylet = subprocess.run([sys.executable, "-c", _RAYLET, _SUPERVISOR, entry, flag], env=env,
                            capture_output=True, text=True, timeout=60)
    assert raylet.stdout.strip() == f"{expect}: -m jobs.train --workers 2", raylet.stderr


def test_runtime_env_modes():
    upload = runtime_env.build_runtime_env("upload")
    assert upload["working_dir"] == str(REPO) and ".venv" in upload["excludes"] and "tests/" in upload["excludes"]
    assert upload["env_vars"]["TF_USE_LEGACY_KERAS"] == "1" and "pip" not in upload
    pip = runtime_env.build_runtime_env("upload+pip")["pip"]["packages"]
    assert any(p.startswith("ray[") and "==2.60.0" in p for p in pip) and not any("extra" in p for p in pip)
    assert "working_dir" not in runtime_env.build_runtime_env("installed")
    with pytest.raises(ConfigError, match="credential"):
        runtime_env.build_runtime_env("upload", env_vars={"AWS_SECRET_ACCESS_KEY": "x"})


def test_relative_paths_are_refused(tmp_path, monkeypatch):
    from jobs import submit as submit_cli

    (tmp_path / "photos").mkdir()
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)

    def check(kind: str, args: list[str]) -> None:
        submit_cli._check_paths(submit_cli._job_namespace(kind, args), args)

    with pytest.raises(ConfigError, match="input photos: relative path"):
        check("label", ["photos", "--model", "s3://b/m", "--out", "s3://b/o"])
    # an output does not exist yet: it was let through, and the job published its rows inside Ray's
    # package cache on the cluster; the --opt=VALUE form skipped the check
    with pytest.raises(ConfigError, match=rf"--out relout: relative path.*Give {tmp_path}/relout or an s3:// URI"):
        check("label", [str(tmp_path / "photos"), "--model", "s3://b/m", "--out", "relout"])
    with pytest.raises(ConfigError, match="--model m: relative path"):
        check("label", [str(tmp_path / "photos"), "--model=m", "--out", "s3://b/o"])
    with pytest.raises(ConfigError, match="--manifest list.csv: relative path"):
        check("label", ["--manifest", "list.csv", "--model", "s3://b/m", "--out", "s3://b/o"])
    with pytest.raises(ConfigError, match="--storage ckpt: relative path"):
        check("train", ["--data", "s3://b/d", "--out", "s3://b/x", "--storage", "ckpt"])
    check("train", ["--data", "s3://b/d", "--out", "/abs/x", "--weights", "imagenet"])  # a keyword, not a path
    check("label", [str(tmp_path / "photos"), "--model", str(tmp_path / "m"), "--out", "s3://b/o"])


# --- exit codes: the manifest decides -----------------------------------------------------------

@dataclass
class FakeInfo:
    status: str
    driver_exit_code: int | None
    metadata: dict
    start_time: int = 0
    message: str = ""
    end_time: int | None = None
    entrypoint: str = ""


def _write_manifest(out: str, run_id: str, exit_code: int, finished_at: str = "2030-01-01T00:00:00+00:00") -> None:
    from core import output

    dest = output.Output(out)
    dest.write_json(dest.published(run_id, output.MANIFEST_FILE), {
        output.M_RUN_ID: run_id, output.M_STATUS: output.STATUS_COMPLETE, output.M_EXIT_CODE: exit_code,
        output.M_IMAGES: 5,
        output.M_LABELLED: 4, output.M_SKIPPED: 0, output.M_ERROR_RATE: 0.2, output.M_MAX_ERROR_RATE: 0.1,
        output.M_FINISHED_AT: finished_at})


@pytest.mark.parametrize("env, expect", [
    ({"RAY_ADDRESS": "http://head:8265"}, "http://head:8265"),
    ({"RAY_ADDRESS": "10.0.0.5:6379"}, "10.0.0.5:6379"),  # was replaced by localhost's 8265: maybe another cluster
    ({"RAY_ADDRESS": "auto"}, cluster_submit.DEFAULT_ADDRESS),
    ({"RAY_ADDRESS": "10.0.0.5:6379", "RAY_API_SERVER_ADDRESS": "http://api:8265"}, "http://api:8265"),
])
def test_the_job_api_address_comes_from_the_environment(monkeypatch, env, expect):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cluster_submit.default_address() == expect


def test_label_values_are_checked_before_sending(tmp_path):
    """Only argparse's types were checked here: `--top-k 0` was sent, and failed on the cluster."""
    from jobs import submit as submit_cli

    parser = argparse.ArgumentParser()
    submit_cli.add_arguments(parser)
    for bad, says in ((["--top-k", "0"], "--top-k must be at least 1"), (["--lease-ttl", "1"], "--lease-ttl must be")):
        ns = parser.parse_args(["label", "s3://b/in", "--model", "s3://b/m", "--out", "s3://b/o", *bad])
        with pytest.raises(ConfigError, match=says):
            submit_cli.build_request(ns, submit_cli.split_args(ns))


def test_exit_codes_follow_the_manifest(tmp_path):
    out = str(tmp_path / "labels")
    meta = {cluster_submit.META_KIND: "label", cluster_submit.META_OUTPUT: out}
    # Ray says SUCCEEDED but nothing was published: failed
    assert cluster_submit.outcome(FakeInfo("SUCCEEDED", 0, meta)).exit_code == 1
    _write_manifest(out, "r1", 0)
    done = cluster_submit.outcome(FakeInfo("SUCCEEDED", 0, meta))
    assert done.exit_code == 0 and "5 images" in done.message
    _write_manifest(out, "r2", 3, finished_at="2031-01-01T00:00:00+00:00")
    over = cluster_submit.outcome(FakeInfo("FAILED", 3, meta))  # the newest manifest finished after the job started
    assert over.exit_code == 3 and "error rate" in over.message
    # a job that failed is failed, whatever manifests other runs wrote
    assert cluster_submit.outcome(FakeInfo("FAILED", 1, meta)).exit_code == 1
    assert cluster_submit.outcome(FakeInfo("FAILED", 75, meta)).exit_code == 75
    stopped = cluster_submit.outcome(FakeInfo("STOPPED", None, meta))
    assert stopped.exit_code == 1 and stopped.message.startswith("stopped before it finished; ")
    stopped = cluster_submit.outcome(FakeInfo("STOPPED", None, {cluster_submit.META_KIND: "tune"}))
    assert stopped.message == ("stopped before it finished; submit the same job again with --restore to resume the "
                               "search")
    assert cluster_submit.outcome(FakeInfo("STOPPED", None, {})).message == "stopped before it finished"
    assert cluster_submit.outcome(FakeInfo("FAILED", 2, meta)).exit_code == 2
    assert cluster_submit.outcome(FakeInfo("SUCCEEDED", 0, {cluster_submit.META_KIND: "train"})).exit_code == 0
    assert cluster_submit.outcome(FakeInfo("FAILED", 1, {cluster_submit.META_KIND: "train"})).exit_code == 1


def test_a_stopped_label_job_says_rows_are_staged_only_when_they_are(tmp_path, monkeypatch):
    """`jobs status` said "what it labelled is staged" of every stopped label job, one stopped
    before its first row too: it says so when the output holds staged rows, and hedges when it
    cannot read the output."""
    from core import output

    out = str(tmp_path / "labels")
    meta = {cluster_submit.META_KIND: "label", cluster_submit.META_OUTPUT: out}
    stopped = cluster_submit.outcome(FakeInfo("STOPPED", None, meta))
    assert stopped.exit_code == 1 and stopped.message == (
        f"stopped before it finished; nothing is staged under {out}: submit the same job again to label what is "
        "left")
    dest = output.Output(out)
    dest.write_json(dest.staging("r1", output.RUN_FILE), {output.M_RUN_ID: "r1"})  # begun, no row staged yet
    assert "nothing is staged" in cluster_submit.outcome(FakeInfo("STOPPED", None, meta)).message
    (Path(dest.staging("r1")) / output.part_name(0, 0)).write_bytes(b"PAR1")
    assert cluster_submit.outcome(FakeInfo("STOPPED", None, meta)).message == (
        f"stopped before it finished; rows are staged under {out}: submit the same job again to resume")

    def no_access(self):
        raise StorageError(f"{self.uri}: access denied")

    monkeypatch.setattr(output.Output, "staged_runs", no_access)  # e.g. no credentials for its bucket here
    assert cluster_submit.outcome(FakeInfo("STOPPED", None, meta)).message == (
        "stopped before it finished; anything it labelled is staged: submit the same job again to resume")


def test_a_failed_jobs_line_is_one_line():
    """Ray's message for a failed entrypoint goes on with up to 20,000 characters of the job's log
    (printed above already as its tail): the closing line was that whole log, a second time."""
    log = ("Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
           "2026-12-05 14:09:35,326\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
           + "epoch 1/5 ...\n" * 500 +
           "breedlabel train: error: /data/b: a bundle already exists there; export to a new location\n")
    failed = cluster_submit.outcome(FakeInfo("FAILED", 1, {cluster_submit.META_KIND: "train"}, message=log))
    assert failed.message == ("failed (exit code 1): breedlabel train: error: /data/b: a bundle already exists "
                              "there; export to a new location")
    label = {cluster_submit.META_KIND: "label", cluster_submit.META_OUTPUT: "/o"}
    bad = log.replace("breedlabel train: error: /data/b: a bundle already exists there; export to a new location",
                      "breedlabel label: error: bundle /b not found or empty; check the URI")
    failed = cluster_submit.outcome(FakeInfo("FAILED", 1, label, message=bad))
    assert failed.message.startswith("failed (exit code 1): breedlabel label: error: bundle /b not found or empty; "
                                     "check the URI; nothing of it is published"), failed.message
    crashed = cluster_submit.outcome(FakeInfo("FAILED", 1, {}, message=log.replace("breedlabel train: error", "x")))
    assert crashed.message == ("failed (exit code 1): Job entrypoint command failed with exit code 1, last "
                               "available logs (truncated to 20,000 chars):")


def test_a_plain_ray_job_submit_label_job_is_judged_by_its_manifest(tmp_path):
    """README: `ray job submit` reads no manifest, `breedlabel jobs status` does; with no breedlabel
    metadata on the job it judged by Ray's status alone ("SUCCEEDED: succeeded")."""
    out = str(tmp_path / "labels")
    ray_job = FakeInfo("SUCCEEDED", 0, {}, entrypoint=f"/venv/bin/python -m jobs.label s3://b/in --model s3://b/m "
                                                      f"--out {out} --incremental")
    judged = cluster_submit.outcome(ray_job)
    assert judged.exit_code == 1 and f"no run manifest under {out}" in judged.message
    _write_manifest(out, "r1", 3)
    assert cluster_submit.outcome(ray_job).exit_code == 3
    dry = FakeInfo("SUCCEEDED", 0, {}, entrypoint=f"python -m jobs.label s3://b/in --model m --out {out} --dry-run")
    assert cluster_submit.outcome(dry).message == "succeeded"


def test_an_ended_job_is_judged_by_its_own_run_not_a_later_one(tmp_path):
    """`jobs status` of a job that ended over the error budget read 'done …' with exit 0 once a later
    run had finished on the same output: the newest manifest after the job's start was taken."""
    from core import output

    out = str(tmp_path / "labels")
    meta = {cluster_submit.META_KIND: "label", cluster_submit.META_OUTPUT: out}
    ms = lambda iso: int(cluster_submit._epoch(iso) * 1000)  # noqa: E731
    _write_manifest(out, "r1", 3, finished_at="2030-01-01T00:00:10+00:00")
    _write_manifest(out, "r2", 0, finished_at="2030-01-01T01:00:10+00:00")  # the next hour's run
    job = FakeInfo("FAILED", 3, meta, start_time=ms("2030-01-01T00:00:00+00:00"),
                   end_time=ms("2030-01-01T00:00:11+00:00"))
    assert cluster_submit.outcome(job).exit_code == 3
    # a job with nothing to label leaves only the output's last-run record, which a later run rewrites
    dest = output.Output(out)
    dest.write_json(dest.path(output.LAST_RUN_FILE), {output.M_RUN_ID: "r3", output.M_EXIT_CODE: 0,
                                                      output.M_FINISHED_AT: "2030-01-01T02:00:10+00:00"})
    noop = FakeInfo("SUCCEEDED", 0, meta, start_time=ms("2030-01-01T01:30:00+00:00"),
                    end_time=ms("2030-01-01T01:30:05+00:00"))
    judged = cluster_submit.outcome(noop)
    assert judged.exit_code == 0 and "a later run on" in judged.message and "r3" not in judged.message
    running_then = FakeInfo("SUCCEEDED", 0, meta, start_time=ms("2030-01-01T03:00:00+00:00"),
                            end_time=ms("2030-01-01T03:00:05+00:00"))
    assert cluster_submit.outcome(running_then).exit_code == 1  # nothing after it: it did not finish


class FlakyClient:
    """Fails like a busy head: a dropped connection, then 'no agent', then accepts."""

    def __init__(self, errors):
        self.errors, self.calls = list(errors), []

    def submit_job(self, **kwargs):
        self.calls.append(kwargs)
        if self.errors:
            raise self.errors.pop(0)
        return kwargs["submission_id"]


class LostReplyClient(FlakyClient):
    def submit_job(self, **kwargs):
        self.calls.append(kwargs)
        if len(self.calls) == 1:
            raise OSError("Connection aborted")
        raise RuntimeError(f"Job with submission_id {kwargs['submission_id']} already exists")


def test_submit_retries_a_busy_head(monkeypatch):
    monkeypatch.setattr(cluster_submit, "POLL_S", 0.01)
    req = cluster_submit.JobRequest(kind="train", job_args=(), runtime_env={})
    client = FlakyClient([OSError("Connection aborted"), RuntimeError("500: No available agent to submit job")])
    assert cluster_submit.submit(client, req).startswith("breedlabel-train-") and len(client.calls) == 3
    lost_reply = LostReplyClient([])  # accepted the first time, but the reply never came back
    assert cluster_submit.submit(lost_reply, req).startswith("breedlabel-train-") and len(lost_reply.calls) == 2
    with pytest.raises(JobError, match="bad entrypoint"):
        cluster_submit.submit(FlakyClient([RuntimeError("400: bad entrypoint")]), req)


def test_cli_registers_submit_and_jobs():
    from jobs.cli import COMMANDS

    assert COMMANDS["submit"][0] == "jobs.submit" and COMMANDS["jobs"][0] == "jobs.jobs_cmd"


# --- stdout carries the job id only ---------------------------------------------------------------

class FinishedJobClient:
    """Accepts a job that has already SUCCEEDED, with one line of log."""

    def submit_job(self, **kwargs):
        return kwargs["submission_id"]

    def get_job_info(self, job_id):
        return FakeInfo("SUCCEEDED", 0, {cluster_submit.META_KIND: "train"})

    def get_job_logs(self, job_id):
        return "the job's log\n"

    async def tail_job_logs(self, job_id):
        yield "the job's log\n"


@pytest.mark.parametrize("mode", [[], ["--wait"], ["--follow"]])
def test_submit_prints_only_the_job_id_on_stdout(tmp_path, monkeypatch, capsys, mode):
    """`JOB=$(breedlabel submit …)` gets the id, whatever else submit says (on stderr)."""
    from jobs.cli import main

    monkeypatch.setattr(cluster_submit, "connect", lambda address: FinishedJobClient())
    code = main(["submit", "train", "--data", str(tmp_path), "--out", str(tmp_path / "b"), *mode])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("\n") == 1 and out.strip().startswith("breedlabel-train-"), out
    if mode:
        assert "SUCCEEDED" in err and "SUCCEEDED" not in out
    if mode == ["--follow"]:
        assert "the job's log" in err


class DroppedStreamClient(FinishedJobClient):
    """A running job whose log stream drops after one line (a head restart, a proxy's idle timeout)."""

    def get_job_info(self, job_id):
        return FakeInfo("RUNNING", None, {cluster_submit.META_KIND: "train"})

    async def tail_job_logs(self, job_id):
        yield "epoch 1\n"
        raise ConnectionResetError("connection reset by peer")


def test_jobs_logs_follow_of_a_dropped_stream_says_so(monkeypatch, capsys):
    """It said "waiting by polling" and exited 0 at once (nothing polled), as if the job had ended."""
    from jobs.cli import main

    monkeypatch.setattr(cluster_submit, "connect", lambda address: DroppedStreamClient())
    code = main(["jobs", "logs", "j1", "--follow"])
    out, err = capsys.readouterr()
    assert code == 1 and out == "epoch 1\n"
    assert err.strip().splitlines()[-1] == ("breedlabel jobs: error: job j1 is still RUNNING but its log stream "
                                            "ended; run the same command again to go on following it"), err


class EndedJobClient(FinishedJobClient):
    def stop_job(self, job_id):
        return False  # Ray's answer for a job that is not running


def test_jobs_stop_of_an_ended_job_is_done_and_list_takes_no_id(monkeypatch, capsys):
    """A script making sure a job is stopped got exit 1 ("was not running") for a job that had ended;
    `jobs list foo` ignored the id without a word."""
    from jobs.cli import main

    monkeypatch.setattr(cluster_submit, "connect", lambda address: EndedJobClient())
    assert main(["jobs", "stop", "j1"]) == 0
    assert capsys.readouterr().out == "j1 SUCCEEDED already; nothing to stop\n"
    assert main(["jobs", "list", "j1"]) == 2
    assert "jobs list takes no job id (j1)" in capsys.readouterr().err

    for bad in (".", "a/b", "%2e", "../x"):  # into the API's URL path: a traceback or raw HTTP 404/405 errors
        assert main(["jobs", "status", bad]) == 2
        assert f"job id {bad!r}: not a job id" in capsys.readouterr().err


class EntrypointLogClient(FinishedJobClient):
    def get_job_logs(self, job_id):
        return f"Running entrypoint for job {job_id}: {cluster_submit.RAY_PYTHON} -m jobs.label /in --out /o\n"

    async def tail_job_logs(self, job_id):
        yield self.get_job_logs(job_id)


@pytest.mark.parametrize("follow", [[], ["--follow"]])
def test_job_logs_show_the_entrypoint_as_a_person_reads_it(monkeypatch, capsys, follow):
    """The log's first line held the interpreter lookup (`PY=$(tr '\\000' … /proc/…)`), a shell one-liner."""
    from jobs.cli import main

    monkeypatch.setattr(cluster_submit, "connect", lambda address: EntrypointLogClient())
    assert main(["jobs", "logs", "j1", *follow]) == 0
    assert capsys.readouterr().out == "Running entrypoint for job j1: python -m jobs.label /in --out /o\n"
