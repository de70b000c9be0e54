"""What a grid needs from a Ray cluster of several nodes before it spends any compute: the
workers' environment (object-store endpoint and credentials) and artifact storage that every
node can see.

- ``worker_env()``: the standard AWS variables of the driver, given to every worker through
  Ray's job ``runtime_env={"env_vars": ...}`` (https://docs.ray.io/en/latest/ray-core/handling-dependencies.html),
  so a node started without them (``ray start`` in another shell, an autoscaled node) reads and
  writes the same ``s3://`` store. Values are never printed; ``describe_env`` names the variables only.
- ``check_artifacts``: a local artifact path on a cluster of more than one alive node is
  refused unless the user says it is shared (``--shared-fs`` or ``BDGRID_SHARED_FS=1``); then a
  task pinned to every node reads a probe file the driver wrote there and writes one back,
  and the nodes that cannot see it are named. Without this a node with its own disk wrote
  artifacts its siblings could not read: their stages failed with FileNotFoundError after
  their parents' compute was spent (issue 18).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

# https://docs.aws.amazon.com/sdkref/latest/guide/environment-variables.html (the ones pyarrow's S3 reads)
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CA_BUNDLE",
            "AWS_EC2_METADATA_DISABLED")
PROBE_TIMEOUT = 60.0  # seconds every node gets to answer the shared-folder probe


class ClusterError(RuntimeError):
    """The cluster cannot run this grid as configured; the message says why and what to do."""


def worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in AWS_VARS if os.environ.get(k)}


def describe_env(env: dict) -> str:
    return ", ".join(sorted(env)) or "none"


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def node_name(n: dict) -> str:
    return f"{n.get('NodeManagerHostname', '?')} ({n.get('NodeManagerAddress', '?')}, node {n['NodeID'][:12]})"


def check_artifacts(root: str, shared_fs: bool = False) -> None:
    """Refuse (ClusterError) a local artifact ``root`` that not every alive node can see."""
    if "://" in root and not root.startswith("file://"):
        return  # an object store: every node reaches it (with worker_env's credentials)
    import ray

    if not ray.is_initialized():
        return  # no cluster joined (yet): nothing to check against
    nodes = alive_nodes()
    if len(nodes) <= 1:
        return
    shared_fs = shared_fs or os.environ.get("BDGRID_SHARED_FS") == "1"
    if not shared_fs:
        raise ClusterError(
            f"the artifacts go to the local path {root}, but the Ray cluster has {len(nodes)} nodes: a node with its "
            f"own disk would write artifacts the others cannot read. Use an object store (--artifacts "
            f"s3://bucket/prefix) or, if {root} is on a file system every node mounts (NFS), say so with "
            f"--shared-fs (or BDGRID_SHARED_FS=1); bdgrid then checks it from every node")
    blind = probe_shared(root.removeprefix("file://"), nodes)
    if blind:
        raise ClusterError(f"--shared-fs: {root} is not the same folder on every node; these nodes cannot see the "
                           f"file the driver wrote there:\n  " + "\n  ".join(blind))


def probe_shared(root: str, nodes: list[dict], timeout: float = PROBE_TIMEOUT) -> list[str]:
    """Names of the nodes that cannot read the driver's probe file under ``root`` or write one the
    driver can read back (each with the reason); empty when the folder is shared."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = Path(root).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    mine = folder / f".bdgrid-probe-{token}"
    mine.write_text(token)

    @ray.remote(num_cpus=0, max_retries=0)
    def see(path: str, token: str, node: str) -> str:
        p = Path(path)
        try:
            if p.read_text() != token:
                return "reads a different file there"
        except OSError as e:
            return f"cannot read it ({e.strerror or e})"
        try:
            p.with_name(f"{p.name}-{node}").write_text(token)
        except OSError as e:
            return f"cannot write there ({e.strerror or e})"
        return ""

    refs = {see.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(str(mine), token, n["NodeID"][:12]): n for n in nodes}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    blind = []
    try:
        for ref, n in refs.items():
            if ref not in ready:
                blind.append(f"{node_name(n)}: did not answer within {timeout:g} s")
                ray.cancel(ref, force=True)
                continue
            try:
                why = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the node died while answering: it is not usable
                why = f"failed: {type(e).__name__}"
            back = folder / f"{mine.name}-{n['NodeID'][:12]}"
            if not why and not (back.exists() and back.read_text() == token):
                why = "wrote its answer where the driver cannot see it"
            if why:
                blind.append(f"{node_name(n)}: {why}")
    finally:
        for p in folder.glob(f"{mine.name}*"):
            p.unlink(missing_ok=True)
    return blind
