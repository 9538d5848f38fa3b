"""Multi-node behaviour on a real Ray cluster on this machine (ray.cluster_utils.Cluster: a head that
runs no trials and worker nodes), the cluster-launcher config and the shared-storage guard."""
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from spurious.errors import SpuriousError
from tests.conftest import requires_fashion

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    head = config["available_node_types"][config["head_node_type"]]
    workers = [v for k, v in config["available_node_types"].items() if k != config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs the driver, not trials"
    assert any(w["min_workers"] == 0 and w["node_config"]["InstanceType"].startswith(("g", "p")) for w in workers)
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)
    assert any("pip install -q -e ~/rare-spurious-study" in c for c in config["setup_commands"])
    assert "~/rare-spurious-study" in config["file_mounts"]


def test_node_local_storage_on_a_multi_node_cluster_is_refused(monkeypatch):
    from study import cluster

    monkeypatch.setattr(cluster, "alive_nodes", lambda: [{"address": "10.0.0.1"}, {"address": "10.0.0.2"}])
    monkeypatch.setattr(cluster, "nodes_missing_storage", lambda path: ["10.0.0.2"])
    with pytest.raises(SpuriousError, match="not shared with node.*10.0.0.2"):
        cluster.check_storage("/local/results")
    cluster.check_storage("s3://bucket/studies")  # URIs are shared by construction


def result_rows(exp: Path) -> dict[Path, list[dict]]:
    out = {}
    for path in exp.glob("*/result.json"):
        out[path] = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip().endswith("}")]
    return out


@pytest.fixture
def three_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_study_spreads_over_nodes_and_survives_losing_a_worker(three_node_cluster, tmp_path):
    """Trials run on both workers; removing one mid-study restarts its trial from the last checkpoint
    elsewhere, and every trial finishes; a deletion study on a new node reads the checkpoints they wrote.
    (W&B off: this is about nodes; the autoscaling test below runs with default W&B.)"""
    cluster, workers = three_node_cluster
    exp = tmp_path / "multi"
    doctor = subprocess.run([sys.executable, "-m", "study.cli", "doctor", "--address", cluster.address,
                             "--storage-path", str(tmp_path), "--datasets", "fashion", "--wandb", "off"],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "3 node(s)" in doctor.stdout and "every node sees the storage path" in doctor.stdout

    proc = subprocess.Popen([sys.executable, "-m", "study.cli", "run", "demo", "--smoke",
                             "--set", "n_spurious=[0,3,10,100]", "--set", "epochs=5", "--address", cluster.address,
                             "--storage-path", str(tmp_path), "--name", "multi", "--wandb", "off"],
                            stdout=(tmp_path / "run.log").open("w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    victim = workers[0]
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until a trial on the victim node is past its epoch-2 checkpoint
        rows = [r for rs in result_rows(exp).values() for r in rs]
        if any(r.get("node_id") == victim.node_id and r["epoch"] >= 3 for r in rows):
            break
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("no trial reached epoch 3 on the victim node")
    cluster.remove_node(victim)
    proc.wait(timeout=600)
    assert proc.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]

    results = result_rows(exp)
    assert len(results) == 4
    final_nodes = Counter(rows[-1]["node_id"] for rows in results.values())
    all_nodes = {r["node_id"] for rows in results.values() for r in rows}
    assert len(all_nodes) >= 2, "trials must run on more than one node"
    assert victim.node_id not in final_nodes, "no trial may finish on the removed node"
    redone = {p.parent.name: len(rows) - len({r["epoch"] for r in rows}) for p, rows in results.items()}
    moved = [rows for rows in results.values() if {r["node_id"] for r in rows} >= {victim.node_id}]
    assert moved, "a trial must have been moved off the removed node"
    for rows in moved:  # the victim's trial had checkpointed epoch 2: only later epochs may run twice
        epochs = [r["epoch"] for r in rows]
        assert epochs.count(1) == 1 and epochs.count(2) == 1, f"epochs 1-2 were checkpointed, not redone: {epochs}"
        assert sorted(set(epochs)) == [1, 2, 3, 4, 5] and epochs[-1] == 5
    # A deletion study on a node that did not exist while the sources trained: it must read the
    # checkpoints the other nodes wrote (the storage path is shared).
    survivor = next(w for w in workers if w is not victim)
    newcomer = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    cluster.remove_node(survivor)
    delete = subprocess.run([sys.executable, "-m", "study.cli", "delete", "--from", str(exp), "--method",
                             "incremental_retraining", "--set", "retrain_epochs=1", "--filter", "n_spurious=[10,100]",
                             "--address", cluster.address, "--storage-path", str(tmp_path), "--name", "del",
                             "--wandb", "off"], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert delete.returncode == 0, delete.stdout + delete.stderr
    deletion = result_rows(tmp_path / "del")
    assert len(deletion) == 2
    assert {r["node_id"] for rows in deletion.values() for r in rows} == {newcomer.node_id}
    started = Counter(rows[0]["node_id"][:8] for rows in results.values())
    finished = Counter(rows[-1]["node_id"][:8] for rows in results.values())
    print(f"\nnodes: victim {victim.node_id[:8]}; trials started per node {dict(started)}; finished per node "
          f"{dict(finished)}; epochs redone per trial {sorted(redone.values())}")


def publish_node_types(address: str, types: list[tuple[str, dict, int]]) -> None:
    """Publish node types to the cluster's GCS as Ray's autoscaler does (its cluster config)."""
    import ray
    import ray._raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in types:
        group = config.node_group_configs.add()
        group.name, group.max_count = name, max_count
        group.resources.update(resources)
    ray.init(address=address)
    try:
        internal_kv._internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),
                                     config.SerializeToString(), overwrite=True,
                                     namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_autoscaling_cluster_launch_waits_for_its_gpu_worker(tmp_path):
    """cluster.yaml's shape: a head with 0 CPUs, GPU workers from 0. With no worker yet, `study run --gpus-per-trial
    0.5` says trials wait and runs once the worker joins (a few seconds after launch, as an autoscaler's
    would); a trial that no published node type fits is refused in one line."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        publish_node_types(cluster.address, [("head", {"CPU": 0}, 1), ("gpu_worker", {"CPU": 2, "GPU": 1}, 4)])
        base = [sys.executable, "-m", "study.cli", "run", "demo", "--smoke", "--address", cluster.address,
                "--storage-path", str(tmp_path), "--yes"]
        refused = subprocess.run([*base, "--gpus-per-trial", "2", "--name", "too-big"], capture_output=True,
                                 text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "no node type of the cluster's autoscaler fits a trial of 1 CPU and 2 GPU" in refused.stderr
        assert refused.stderr.count("\n") == 1 and not (tmp_path / "too-big").exists()

        log = tmp_path / "run.log"
        proc = subprocess.Popen([*base, "--gpus-per-trial", "0.5", "--name", "auto"], stdout=log.open("w"),
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and "trials wait for workers" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            time.sleep(0.3)
        assert "trials wait for workers" in log.read_text()
        time.sleep(3)
        worker = cluster.add_node(num_cpus=2, num_gpus=1)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        rows = result_rows(tmp_path / "auto")
        assert len(rows) == 2 and all(r[-1]["epoch"] == 1 for r in rows.values())
        assert {r["node_id"] for rs in rows.values() for r in rs} == {worker.node_id}
    finally:
        cluster.shutdown()
