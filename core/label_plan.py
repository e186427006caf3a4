"""The shape of a labelling pipeline: a pure function of the config and the cluster's resources.

Kept apart from Ray so it is tested with plain numbers: jobs.label_pipeline reads the cluster
(`ray.nodes()`) into `ClusterResources` and builds the Ray Data pipeline from the plan.

- CPU nodes, `fused`: one actor per node holding all its cores, decoding on a thread pool and
  inferring on the same cores (measured faster than a separate decode stage: no object-store
  hop, no stage imbalance; see bench/label_throughput.py).
- GPUs, `two-stage`: decode runs as CPU tasks, one TensorFlow actor per GPU infers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from core.label_config import LabelConfig

FUSED = "fused"
TWO_STAGE = "two-stage"


@dataclass(frozen=True)
class ClusterResources:
    total_cpus: int          # CPUs of the alive nodes that have at least one
    min_node_cpus: int       # CPUs of the smallest such node (a CPU actor must fit on every node)
    gpus: int


@dataclass(frozen=True)
class PipelinePlan:
    pipeline: str            # FUSED or TWO_STAGE
    actors: int
    cpus_per_actor: int
    gpus_per_actor: int
    decode_threads: int      # per actor (fused) — the two-stage actor gets decoded batches
    runtime_threads: int
    runtime: str             # the runtime asked of the actors: "openvino" or "tensorflow"
    cluster_cpus: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan(cfg: LabelConfig, res: ClusterResources) -> PipelinePlan:
    """Pipeline, actors, CPUs and threads each, from the config (0 = auto) and the cluster."""
    pipeline = cfg.pipeline
    if pipeline == "auto":
        pipeline = TWO_STAGE if res.gpus and cfg.runtime != "openvino" else FUSED
    use_gpu = pipeline == TWO_STAGE and res.gpus > 0 and cfg.runtime != "openvino"
    if use_gpu:
        actors, cpus = cfg.actors or res.gpus, cfg.cpus_per_actor or 1
    elif pipeline == TWO_STAGE:  # on CPU (measured, never the default): leave cores to the decode tasks
        cpus = cfg.cpus_per_actor or max(1, res.min_node_cpus // 2)
        actors = cfg.actors or 1
    else:
        cpus = min(cfg.cpus_per_actor or res.min_node_cpus, max(1, res.total_cpus))
        actors = cfg.actors or max(1, res.total_cpus // cpus)
    runtime = cfg.runtime if cfg.runtime != "auto" else ("tensorflow" if use_gpu else "openvino")
    return PipelinePlan(pipeline=pipeline, actors=actors, cpus_per_actor=cpus, gpus_per_actor=1 if use_gpu else 0,
                        decode_threads=cfg.decode_threads or cpus, runtime_threads=cpus, runtime=runtime,
                        cluster_cpus=res.total_cpus)
