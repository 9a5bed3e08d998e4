"""A two-node Ray cluster on one machine: a head and a second node (`ray start`, loopback ports,
their own temporary folder, started in a folder of their own as on another machine), the proposals
and shards stages run with `--ray-address` on an images table of relative paths; tasks run on both
nodes, the project code is shipped to them, and the output equals a local run's. The
test stops exactly the processes it started (never a global `ray stop`: other Ray instances on
the machine are left alone)."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline import proposals, raycluster, shards
from pipeline import contracts as C
from tests.pipeline.test_proposals import scene
from tests.pipeline.test_shards import make_inputs

RAY = str(Path(sys.executable).parent / "ray")
CFG = proposals.ProposalsConfig(images_per_part=4, images_per_task=1, max_side=256)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


PORTS_PER_NODE = 14      # 6 components + 8 worker ports


def _node_args(temp_dir: str, resources: dict, ports: list[int]) -> list[str]:
    """Ports of every process of a node (`ports`: PORTS_PER_NODE distinct free loopback ports,
    drawn for both nodes at once, so the nodes, their workers and other Ray instances never
    collide; drawn separately, a port freed after one draw can come back in the next), its CPUs,
    resources and temporary folder."""
    node, objects, agent, agent_grpc, env_agent, metrics, *workers = ports
    return [f"--node-manager-port={node}", f"--object-manager-port={objects}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
            f"--worker-port-list={','.join(map(str, workers))}",
            "--node-ip-address=127.0.0.1", "--num-cpus=1", f"--resources={json.dumps(resources)}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block"]


def _start_node(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    """`ray start ARGS` in `cwd`: its workers run there, not in the driver's folder."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    cwd.mkdir(exist_ok=True)
    return subprocess.Popen([RAY, "start", *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, cwd=cwd)


def _ours(marker: str) -> list[int]:
    """Pids of the processes whose command line names our temporary folder (raylets, GCS, workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _stop(nodes: list[subprocess.Popen], temp_dir: str) -> None:
    """SIGTERM each `ray start --block` (it stops its node's processes), then SIGKILL whatever of
    ours is left: the nodes' process groups and any process naming our temporary folder."""
    for p in nodes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in nodes:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in _ours(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A head and a second node on loopback; yields the head's address."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")     # short: Ray's socket paths have a length limit
    port, *ports = _free_ports(1 + 2 * PORTS_PER_NODE)
    address = f"127.0.0.1:{port}"
    head_ports, node2_ports = ports[:PORTS_PER_NODE], ports[PORTS_PER_NODE:]
    nodes = [_start_node(["--head", f"--port={port}", "--include-dashboard=false",
                          *_node_args(temp_dir, {"head": 1}, head_ports)], tmp_path / "head.log", tmp_path / "head")]
    try:
        _wait_for_port(port, nodes[0], tmp_path / "head.log")
        nodes.append(_start_node([f"--address={address}", *_node_args(temp_dir, {"node2": 1}, node2_ports)],
                                 tmp_path / "node2.log", tmp_path / "node2"))
        _wait_for_start(nodes[1], tmp_path / "node2.log")
        yield address
    finally:
        _stop(nodes, temp_dir)
        assert _ours(temp_dir) == []
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the Ray head did not open port {port} in {timeout} s: {log.read_text()[-2000:]}")


def _wait_for_start(proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Wait for `ray start --block` to say the node runs; its log in the error otherwise."""
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the second node did not start (exit code {proc.poll()}): {log.read_text()[-3000:]}")
        time.sleep(0.2)


def _join_and_check_shipping(address: str) -> None:
    """Join through the stages' helper, wait for both nodes, and check that a task on each node
    imports `pipeline` from the code the job shipped (runtime_env py_modules), not the checkout."""
    import ray

    assert raycluster.start(address)
    try:
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, "the second node never joined"
            time.sleep(0.2)

        def where() -> tuple[str, list[str], str]:
            """This node's id, the copies of `pipeline` the job shipped onto its import path, and
            the file the stages' modules load from in an interpreter that has only that copy and
            the dependencies (no checkout, no editable install: what a node on another machine
            has; here the checkout is on the workers' path too, since they share this machine)."""
            import subprocess
            import sys
            import sysconfig
            import tempfile

            shipped = [p for p in sys.path if "runtime_resources" in p and Path(p, "pipeline", "shards.py").is_file()]
            code = ("import sys; sys.path[:0] = [sys.argv[1]]; sys.path.append(sys.argv[2]); "
                    "import pipeline.proposals, pipeline.shards; print(pipeline.__file__)")
            with tempfile.TemporaryDirectory() as cwd:          # -I: no PYTHONPATH; -S: no .pth (editable) hooks
                loaded = subprocess.run([sys.executable, "-I", "-S", "-c", code, shipped[0] if shipped else "",
                                         sysconfig.get_paths()["purelib"]], cwd=cwd, capture_output=True,
                                        text=True).stdout.strip()
            return ray.get_runtime_context().get_node_id(), shipped, loaded

        got = ray.get([ray.remote(resources={r: 1}, num_cpus=0)(where).remote() for r in ("head", "node2")])
        assert len({node for node, _, _ in got}) == 2
        assert all(len(shipped) == 1 for _, shipped, _ in got), got
        assert all(loaded.startswith(shipped[0] + "/") for _, shipped, loaded in got), got
    finally:
        raycluster.stop()


def _wait_idle(address: str, timeout: float = 30) -> None:
    """Wait until every CPU of the cluster is free again (a finished job's leases are returned
    asynchronously; a stage started before that finds one node busy and runs everything on the other)."""
    import ray

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        deadline = time.monotonic() + timeout
        while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
            assert time.monotonic() < deadline, f"the cluster's CPUs stay busy: {ray.available_resources()}"
            time.sleep(0.1)
    finally:
        ray.shutdown()


def _tasks_per_node(caplog, stage: str) -> dict[str, int]:
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{stage} run (not in")][-1]
    return json.loads(line.split(": ", 1)[1])["tasks_per_node"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _inputs(root: Path) -> Path:
    """The images of `make_inputs` (JPEGs, a PNG, a missing file) plus 6 scenes of 640x480 as PNG:
    their selective search and their re-encoding as JPEG take long enough (tenths of a second per
    task) that both nodes get tasks while the other works. Paths relative to `root` (the stages
    run there), as in the embedded images tables."""
    import pyarrow as pa
    from PIL import Image

    images, _, _ = make_inputs(root, n=3)
    rows = C.read_table(images, C.IMAGES).to_pylist()
    for i in range(6):
        path = root / "img" / f"scene{i}.png"
        Image.fromarray(scene(i, 640, 480)).save(path)
        rows.append({"key": f"scene{i}", "source": "test", "image_id": f"scene{i}", "path": str(path),
                     "width": 640, "height": 480})
    rows = [dict(r, path=os.path.relpath(r["path"], root)) for r in rows]
    assert not any(Path(r["path"]).is_absolute() for r in rows)
    return C.write_table(pa.Table.from_pylist(rows), root / "images.parquet", C.IMAGES)


def test_two_node_cluster_runs_proposals_and_shards_like_a_local_run(cluster, tmp_path, caplog, monkeypatch):
    images = _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)          # the driver's folder: the table's paths are relative to it
    local, remote = tmp_path / "local", tmp_path / "cluster"
    raycluster.start(None, 2)            # one local Ray for both local runs
    try:
        proposals.run(images, local / "props", CFG, progress=False)
        shards.run(images, local / "props", local / "shards", shards.ShardsConfig(samples_per_shard=1), progress=False)
    finally:
        raycluster.stop()

    _join_and_check_shipping(cluster)
    caplog.set_level(logging.INFO)
    caplog.clear()          # only the two stages' records below (an earlier test may have set INFO already)
    params = tmp_path / "params.yaml"
    params.write_text("proposals:\n  images_per_part: 4\n  images_per_task: 1\n  max_side: 256\n"
                      "shards:\n  samples_per_shard: 1\n")
    # --num-workers on a cluster: tasks in flight; more than its 2 CPUs keeps a task waiting for
    # each node, so both get work even when tasks are short.
    assert proposals.main(["--images", str(images), "--out", str(remote / "props"), "--ray-address", cluster,
                           "--params", str(params), "--num-workers", "4"]) == 0
    _wait_idle(cluster)      # the proposals job's workers give their CPUs back asynchronously
    assert shards.main(["--images", str(images), "--proposals", str(remote / "props"), "--out",
                        str(remote / "shards"), "--ray-address", cluster, "--params", str(params)]) == 0
    joined = [r.getMessage() for r in caplog.records if r.getMessage().startswith("joined the Ray cluster")]
    assert len(joined) == 2 and all(": 2 nodes, 2 CPUs" in m for m in joined), joined
    for stage in ("proposals", "shards"):
        per_node = _tasks_per_node(caplog, stage)
        assert len(per_node) == 2 and all(n > 0 for n in per_node.values()), (stage, per_node)

    assert _files(remote / "props") == _files(local / "props")
    assert _files(remote / "shards") == _files(local / "shards")
    index = json.loads((remote / "shards" / "index.json").read_text())
    assert index["total_samples"] == 10 and index["failure_reasons"] == {"proposals_failed": 1}, index["failures"]
    for text in (json.dumps(index["failures"]), (remote / "props" / "failures.csv").read_text()):
        assert str(tmp_path) not in text                # failures name the path as the table gives it


def test_stages_set_no_environment_at_import_and_the_helper_sets_local_defaults_at_start():
    """Importing the stages changes no environment variable of ours; starting a local Ray through the
    helper switches usage statistics and token authentication off unless the environment says
    otherwise, with the CPUs asked for; a second start is a no-op."""
    code = ("import os, sys\n"
            "before = dict(os.environ)\n"
            "import pipeline.proposals, pipeline.shards, train.stream\n"
            "changed = {k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k)}\n"
            "assert changed <= {'LD_LIBRARY_PATH'}, changed\n"   # OpenCV's own loader sets that one
            "from pipeline import raycluster\n"
            "import ray\n"
            "assert raycluster.start(None, 1) and not raycluster.start(None, 1)\n"
            "print(os.environ['RAY_USAGE_STATS_ENABLED'], os.environ['RAY_AUTH_MODE'],\n"
            "      ray.cluster_resources()['CPU'])\n"
            "raycluster.stop()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0", "disabled", "1.0"]
