"""A multi-node Ray cluster on this machine, as real processes: `ray start --head` and
`ray start --address` per worker node, each on its own loopback ports and one temp dir.

Every node runs `ray start --block` in its own session, so stopping the cluster means
signalling exactly the processes this helper started (and their descendants), never another
Ray instance on the machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_autoscaling_config(gcs_port: int, head_cpus: int, worker_types: dict, idle_timeout_minutes: float = 0.1) -> dict:
    """A complete autoscaling config for `provider: fake_multinode` (the Ray wheel lacks the
    example file Ray's own helper reads): worker nodes are real raylets on this machine."""
    types = {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
    types.update({name: {"node_config": {}, **spec} for name, spec in worker_types.items()})
    return {
        "cluster_name": "skustudio-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        # Ray's fake provider is read-only: node updaters (which write tags) must be off, or every
        # launched node is torn down as "launch failed" a second later and the run churns nodes.
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},  # fmt: skip
        "auth": {"ssh_user": "ray"},
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _node_ports() -> list[str]:
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


@dataclasses.dataclass
class LocalCluster:
    temp_dir: str
    gcs_port: int
    dashboard_port: int
    env: dict
    token: str
    procs: list = dataclasses.field(default_factory=list)
    logs: list = dataclasses.field(default_factory=list)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @classmethod
    def start(cls, head_cpus: int = 1, workers: list[dict] | None = None, autoscaling: dict | None = None) -> LocalCluster:
        """Head plus `workers` ({cpus, gpus} each) as `ray start` processes; or, with
        `autoscaling` ({node type: {resources, min_workers, max_workers}}), a head whose
        autoscaler adds and removes worker nodes itself (Ray's fake multi-node provider)."""
        # Short temp dir: Ray's unix socket paths must stay under ~107 characters.
        temp = tempfile.mkdtemp(prefix="skmn-", dir="/tmp")
        venv_bin = str(Path(sys.executable).parent)
        # Ray 2.60 clusters require a token: this one gets its own, passed by environment to its
        # nodes and to the clients the tests start (never the machine's ~/.ray/auth_token).
        token = secrets.token_hex(16)
        env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}  # fmt: skip
        env.pop("RAY_ADDRESS", None)
        c = cls(temp_dir=temp, gcs_port=free_port(), dashboard_port=free_port(), env=env, token=token)
        head = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={c.gcs_port}",
                f"--num-cpus={head_cpus}", "--num-gpus=0", f"--temp-dir={temp}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={c.dashboard_port}", f"--ray-client-server-port={free_port()}",
                *_node_ports()]  # fmt: skip
        if autoscaling is not None:
            config = Path(temp) / "autoscaling.json"
            config.write_text(json.dumps(fake_autoscaling_config(c.gcs_port, head_cpus, autoscaling)))
            head.append(f"--autoscaling-config={config}")
            c.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        try:
            c._spawn(head, "head")
            c.wait_http("/api/version", timeout=120)
            for i, w in enumerate(workers or []):
                cmd = ["ray", "start", "--block", f"--address={c.address}", "--node-ip-address=127.0.0.1",
                       f"--num-cpus={w.get('cpus', 1)}", f"--num-gpus={w.get('gpus', 0)}", *_node_ports()]  # fmt: skip
                c._spawn(cmd, f"worker{i}")
                c.wait_nodes(2 + i)  # one at a time: nodes joining at once on one IP can race
        except BaseException:
            c.stop()  # never leave a half-started cluster behind
            raise
        return c

    def get_json(self, path: str):
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(Path(self.temp_dir) / f"{name}.out", "w")
        self.logs.append(log)
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def wait_http(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get_json(path)
                return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Ray dashboard at {self.dashboard} did not answer {path} in {timeout}s")

    def alive_nodes(self) -> list[dict]:
        """Alive nodes from the state API: dicts with node_id, resources_total, ..."""
        body = self.get_json("/api/v0/nodes?limit=1000&detail=1")
        return [n for n in body["data"]["result"]["result"] if n.get("state") == "ALIVE"]

    def autoscaler_events(self) -> str:
        """The autoscaler's event lines (adding / removing nodes and why), for assertions and
        for failure messages."""
        lines = []
        for log in Path(self.temp_dir).glob("session_*/logs/monitor.log"):
            lines += [ln for ln in log.read_text(errors="replace").splitlines() if "event_summary" in ln or "Terminating" in ln]
        return "\n".join(lines)

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if len(self.alive_nodes()) >= n:
                    return
            except Exception:  # noqa: BLE001 - the state API comes up after the dashboard
                pass
            time.sleep(0.5)
        logs = {p.name: p.read_text()[-1500:] for p in Path(self.temp_dir).glob("*.out")}
        raise TimeoutError(f"{n} Ray nodes were not alive after {timeout}s; node logs: {logs}")

    def stop(self) -> None:
        """Stop every process this cluster started: the `ray start` sessions and anything they
        spawned (found by parentage before signalling, so nothing else is touched)."""
        family = []
        for p in self.procs:
            try:
                family += [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
            except psutil.Error:
                pass
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for pid in family:
            try:
                psutil.Process(pid).wait(timeout=max(0.1, deadline - time.monotonic()))
            except psutil.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
            except psutil.Error:
                pass
        for log in self.logs:
            log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
