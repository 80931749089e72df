"""Every deployment file in infra/ parses, validates against the schemas available offline, and
runs a command line that `skustudio run` accepts."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from pipelines.cli import check_run_args
from pipelines.run import RunConfig
from tests.infra.k8s_check import check_manifest, check_model

INFRA = Path(__file__).resolve().parents[2] / "infra"
KUBE_FILES = sorted((INFRA / "kuberay").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}#{i}:{d.get('kind')}", d) for p in KUBE_FILES for i, d in enumerate(_docs(p))]


def _by_kind(kind: str) -> list[dict]:
    return [d for _, d in _all_docs() if d.get("kind") == kind]


def _entrypoint_args(entrypoint: str) -> list[str]:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["skustudio", "run"], argv
    return argv[2:]


def test_every_kuberay_file_is_present():
    names = {p.name for p in KUBE_FILES}
    assert {"raycluster.yaml", "rayjob-nightly.yaml", "cronjob.yaml", "serviceaccount.yaml"} <= names


@pytest.mark.parametrize("name, doc", _all_docs(), ids=[n for n, _ in _all_docs()])
def test_manifest_validates(name, doc):
    assert check_manifest(doc) == []


def test_the_checker_catches_mistakes():
    # The validators must be able to fail: a misspelled field, a wrong type, a bad enum.
    cron = _by_kind("CronJob")[0]
    bad = json.loads(json.dumps(cron))
    bad["spec"]["schedul"] = bad["spec"].pop("schedule")
    assert any("schedul" in p for p in check_manifest(bad))
    cluster = json.loads(json.dumps(_by_kind("RayCluster")[0]))
    cluster["spec"]["workerGroupSpecs"][1]["maxReplica"] = 3
    cluster["spec"]["autoscalerOptions"]["version"] = "v3"
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    problems = " ".join(check_manifest(cluster))
    assert "maxReplica" in problems and "v3" in problems and "imagee" in problems
    assert check_model({"name": "x", "image": 3}, "V1Container") != []


@pytest.mark.parametrize("spec_of", ["RayCluster", "RayJob"])
def test_cluster_shape(spec_of):
    doc = _by_kind(spec_of)[0]
    spec = doc["spec"] if spec_of == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__  # the image's Ray must match the CRD's
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    pod = gpu["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1  # one image for every node


def test_rayjob_runs_a_valid_skustudio_command_for_the_night():
    job = _by_kind("RayJob")[0]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    args = _entrypoint_args(spec["entrypoint"])
    params = check_run_args(args)
    assert params["run_id"] == "RUN_DATE" and params["address"] == "auto"
    # The CronJob substitutes the date: the result is a valid run id and object name.
    night = "2026-11-22"
    assert RunConfig(manifest="m", recipes=("enhance",), output="o", run_id=params["run_id"].replace("RUN_DATE", night)).resolved_run_id() == night
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"].replace("RUN_DATE", night))


def test_cronjob_creates_the_rayjob_nightly_with_the_date():
    cron = _by_kind("CronJob")[0]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "date -u +%Y-%m-%d" in script and 's/RUN_DATE/${RUN_DATE}/g' in script and "kubectl" in script
    role = _by_kind("Role")[0]
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])


def test_no_credentials_in_any_deployment_file():
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
            assert "AWS_SECRET_ACCESS_KEY=" not in text and "aws_secret_access_key" not in text, path


def test_cluster_launcher_config_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g5", "g6"))
    assert config["idle_timeout_minutes"] > 0 and config["docker"]["image"]


def test_dockerfile_pins_the_ray_version_and_installs_the_project():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in text
    assert "pip install --no-cache-dir ." in text and "skustudio --help" in text
    torch_range = re.search(r'"torch(>=[^"]+)"', text).group(1)
    requires = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch{torch_range}" in requires, (torch_range, requires)  # the image's torch stays in the project's range
