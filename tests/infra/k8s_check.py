"""Offline checks of Kubernetes and KubeRay manifests.

Core objects are walked against the `kubernetes` Python client's generated models (the API's
OpenAPI types): an unknown or misspelled field, or a value of the wrong type, is an error, and
required fields are enforced by the models themselves. KubeRay objects are checked against
the schema of the ray.io/v1 fields skustudio uses (KubeRay v1.6 API reference), with their pod
templates walked as core `V1PodTemplateSpec` objects.
"""

from __future__ import annotations

import re

import jsonschema
import kubernetes.client as k8s

_LIST = re.compile(r"^list\[(.+)\]$")
_DICT = re.compile(r"^dict\(([^,]+), (.+)\)$")
_PRIMITIVE = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "object": (object,), "datetime": (str,)}


def check_model(data, type_name: str, path: str = "") -> list[str]:
    """Problems found walking `data` as the client model `type_name`."""
    if m := _LIST.match(type_name):
        if not isinstance(data, list):
            return [f"{path}: expected a list, got {type(data).__name__}"]
        return [p for i, item in enumerate(data) for p in check_model(item, m.group(1), f"{path}[{i}]")]
    if m := _DICT.match(type_name):
        if not isinstance(data, dict):
            return [f"{path}: expected a map, got {type(data).__name__}"]
        # Resource quantities ("4", 16Gi, 0.5) are int-or-string in the API.
        inner = m.group(2)
        return [p for key, v in data.items() for p in ([] if inner == "str" and isinstance(v, (int, float)) else check_model(v, inner, f"{path}.{key}"))]
    if type_name in _PRIMITIVE:
        if type_name == "int" and isinstance(data, bool):
            return [f"{path}: expected int, got bool"]
        return [] if isinstance(data, _PRIMITIVE[type_name]) else [f"{path}: expected {type_name}, got {type(data).__name__} ({data!r})"]
    model = getattr(k8s, type_name)
    if not isinstance(data, dict):
        return [f"{path}: expected {type_name} (a map), got {type(data).__name__}"]
    by_json = {v: k for k, v in model.attribute_map.items()}
    problems = [f"{path}.{key}: not a field of {type_name}" for key in data if key not in by_json]
    for key, value in data.items():
        if key in by_json:
            problems += check_model(value, model.openapi_types[by_json[key]], f"{path}.{key}")
    if not problems:
        try:  # required fields: the generated models refuse to be built without them
            k8s.ApiClient()._ApiClient__deserialize(data, type_name)
        except (ValueError, TypeError) as exc:
            problems.append(f"{path}: {type_name}: {exc}")
    return problems


CORE_KINDS = {
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("batch/v1", "CronJob"): "V1CronJob",
    ("batch/v1", "Job"): "V1Job",
}

_POD_TEMPLATE = {"type": "object", "x-k8s": "V1PodTemplateSpec"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_GROUP_COMMON = {
    "rayStartParams": _STR_MAP,
    "template": _POD_TEMPLATE,
    "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "version": {"enum": ["v1", "v2"]},
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                "resources": {"type": "object", "x-k8s": "V1ResourceRequirements"},
                "image": {"type": "string"},
                "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                "env": {"type": "array"},
                "envFrom": {"type": "array"},
                "securityContext": {"type": "object"},
            },
        },
        "headGroupSpec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["template"],
            "properties": {**_GROUP_COMMON, "headService": {"type": "object"}, "enableIngress": {"type": "boolean"}},
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["groupName", "template"],
                "properties": {
                    **_GROUP_COMMON,
                    "groupName": {"type": "string"},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                    "numOfHosts": {"type": "integer", "minimum": 1},
                    "suspend": {"type": "boolean"},
                },
            },
        },
        "suspend": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"},
    },
}
RAY_JOB_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["entrypoint"],
    "properties": {
        "entrypoint": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "clusterSelector": _STR_MAP,
        "runtimeEnvYAML": {"type": "string"},
        "metadata": _STR_MAP,
        "jobId": {"type": "string"},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "submitterPodTemplate": _POD_TEMPLATE,
        "suspend": {"type": "boolean"},
    },
}
KUBERAY_KINDS = {("ray.io/v1", "RayCluster"): RAY_CLUSTER_SPEC, ("ray.io/v1", "RayJob"): RAY_JOB_SPEC}


def _k8s_refs(schema: dict, data, path: str) -> list[str]:
    """Walk the parts of `data` the schema marks as core objects (x-k8s) with check_model."""
    problems = []
    if not isinstance(data, (dict, list)):
        return problems
    if "x-k8s" in schema:
        return check_model(data, schema["x-k8s"], path)
    if isinstance(data, dict):
        for key, value in data.items():
            sub = schema.get("properties", {}).get(key)
            if sub:
                problems += _k8s_refs(sub, value, f"{path}.{key}")
    elif "items" in schema:
        for i, item in enumerate(data):
            problems += _k8s_refs(schema["items"], item, f"{path}[{i}]")
    return problems


def check_manifest(doc: dict) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CORE_KINDS:
        return check_model(doc, CORE_KINDS[key], doc["kind"])
    if key in KUBERAY_KINDS:
        schema = KUBERAY_KINDS[key]
        problems = check_model(doc.get("metadata", {}), "V1ObjectMeta", f"{doc['kind']}.metadata")
        problems += [f"{doc['kind']}.spec: {e.message} at {list(e.absolute_path)}" for e in jsonschema.Draft202012Validator(schema).iter_errors(doc.get("spec", {}))]
        problems += _k8s_refs(schema, doc.get("spec", {}), f"{doc['kind']}.spec")
        extra = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
        problems += [f"{doc['kind']}: unknown top-level field {f!r}" for f in extra]
        return problems
    return [f"unknown kind {key}"]
