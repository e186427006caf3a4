"""Ray cluster addresses, probed before Ray's own retries: `ray.init` and the job API's GCS
client retry an address where no Ray answers for minutes (20 attempts of ~11 s for ray.init,
~40 s for the job client), silent and deaf to Ctrl-C, then end in a traceback. A TCP connect and
a gRPC handshake tell in seconds."""
from __future__ import annotations

import os
import socket
import time

from core.errors import JobError


def check_reachable(address: str, given: str = "--address", *, timeout_s: float = 5.0, attempts: int = 2) -> None:
    """Fail in seconds when nothing listens at a cluster address: `ray.init` retries a GCS that
    does not answer for minutes (20 attempts of ~11 s), without a word and deaf to Ctrl-C while
    its C++ client waits. Addresses that are not host:port or ray://host:port ('auto') are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or "://" in host:
        return
    for attempt in range(attempts):
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
            break
        except OSError as exc:
            error = exc
            if attempt + 1 < attempts:
                time.sleep(1)
    else:
        raise JobError(f"{given} {address}: no Ray cluster answers there ({error.strerror or error}; {attempts} "
                       f"attempts, {timeout_s:.0f} s each); start it (`ray start --head`), or give the right "
                       "address, or none for a Ray of this command's own")
    if not _speaks_grpc(f"{host}:{port}", timeout_s):
        raise JobError(f"{given} {address}: something listens there, but not a Ray cluster (no gRPC answer in "
                       f"{timeout_s:.0f} s); give the address `ray status` prints on the cluster's head (GCS, "
                       "port 6379 by default; ray://HEAD:10001 for Ray Client), or none for a Ray of this "
                       "command's own")


def _speaks_grpc(target: str, timeout_s: float) -> bool:
    """Whether the server at `target` completes a gRPC (HTTP/2) handshake, as Ray's GCS and Ray Client
    server do: `ray.init` against anything else (an SSH or web port) hangs for ~2 minutes. A cluster
    with TLS (RAY_USE_TLS) is left to Ray: a plain channel cannot tell it from a wrong port."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return True
    import grpc

    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()
