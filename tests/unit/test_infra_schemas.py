"""Every Kubernetes manifest under infra/ validated the way `kubectl apply` would validate it.

- Core objects (PVC, StorageClass, Namespace, Deployment, StatefulSet, Service, Secret) against
  Kubernetes' own OpenAPI-derived JSON schemas, strict (unknown fields rejected), as shipped by
  the `kubernetes-validate` package, for the oldest and newest Kubernetes versions the infra
  README names.
- KubeRay objects (RayCluster, RayJob; RayService for edits) against infra/schemas/kuberay-v1.6.yaml,
  the KubeRay v1.6 CRD fields, whose embedded pod templates, env vars, resources and services
  resolve to the same Kubernetes schemas.

No network: every schema is a file in the repository or in an installed package. Each
manifest is also broken on purpose (an unknown field, a wrong type) to prove the check bites.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate  # the `dev` extra: installed by `make install`, so never skipped
import pytest
import yaml
from referencing import Registry, Resource  # a jsonschema dependency

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY_SCHEMA = INFRA / "schemas" / "kuberay-v1.6.yaml"
K8S_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
# Oldest and newest Kubernetes minor versions infra/README.md supports.
K8S_VERSIONS = ("1.30", "1.37")
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
# Not Kubernetes objects: compose, the Ray cluster launcher, the schemas themselves.
NOT_K8S = {"mlflow/docker-compose.yaml", "cluster-launcher/aws-gpu.yaml"}


def manifest_docs() -> list[tuple[str, int, dict]]:
    """(path under infra/, index in file, document) for every Kubernetes object under infra/."""
    out = []
    for path in sorted(INFRA.rglob("*.yaml")):
        rel = str(path.relative_to(INFRA))
        if rel in NOT_K8S or rel.startswith("schemas/"):
            continue
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        out += [(rel, i, d) for i, d in enumerate(docs)]
    return out


DOCS = manifest_docs()
DOC_IDS = [f"{rel}#{i}:{d.get('kind')}" for rel, i, d in DOCS]


@functools.cache
def k8s_definitions(version: str) -> dict:
    """Kubernetes' strict definitions (additionalProperties: false) from kubernetes-validate."""
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    return json.loads((folder / "_definitions.json").read_text())


@functools.cache
def kuberay_schema() -> dict:
    return yaml.safe_load(KUBERAY_SCHEMA.read_text())


@functools.cache
def kuberay_validator(kind: str, version: str):
    schema = kuberay_schema()
    registry = Registry().with_resources([
        (K8S_DEFINITIONS_ID, Resource.from_contents(k8s_definitions(version))),
        (schema["$id"], Resource.from_contents(schema)),
    ])
    return jsonschema.Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{kind}"}, registry=registry)


def validate(doc: dict, version: str) -> None:
    """Raise jsonschema.ValidationError (or a SchemaNotFoundError for an unknown kind)."""
    if str(doc.get("apiVersion", "")).startswith("ray.io/"):
        assert doc.get("kind") in KUBERAY_KINDS, f"no schema for KubeRay kind {doc.get('kind')!r}"
        kuberay_validator(doc["kind"], version).validate(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


REJECTED = (jsonschema.ValidationError, AssertionError, kubernetes_validate.utils.SchemaNotFoundError)


def assert_rejected(doc: dict, version: str = K8S_VERSIONS[0]) -> None:
    with pytest.raises(REJECTED):
        validate(doc, version)


# --------------------------------------------------------------------------- the files pass


def test_schema_files_are_well_formed():
    jsonschema.Draft202012Validator.check_schema(kuberay_schema())
    for version in K8S_VERSIONS:
        assert "io.k8s.api.core.v1.PodSpec" in k8s_definitions(version)["$defs"]


def test_every_kind_is_covered():
    kinds = {d["kind"] for _, _, d in DOCS}
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim", "StorageClass", "Deployment",
            "StatefulSet", "Service", "Secret", "Namespace"} <= kinds, kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", [d for _, _, d in DOCS], ids=DOC_IDS)
def test_manifest_validates(doc, version):
    validate(doc, version)


def test_rayservice_of_our_cluster_validates():
    """No RayService ships yet; one built from raycluster.yaml's spec must pass, so the schema
    part for it is exercised and ready."""
    rc = next(d for _, _, d in DOCS if d["kind"] == "RayCluster")
    svc = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "lorapipe-serve"},
           "spec": {"serveConfigV2": "applications: []", "rayClusterConfig": copy.deepcopy(rc["spec"]),
                    "upgradeStrategy": {"type": "NewCluster"}}}
    validate(svc, K8S_VERSIONS[-1])
    svc["spec"]["serveConfigV2"] = {"applications": []}  # a mapping where the CRD wants a string
    assert_rejected(svc)


# --------------------------------------------------------------------------- broken copies fail


def scalar_paths(node, path=()):
    """Paths of every scalar leaf inside node."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from scalar_paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from scalar_paths(v, path + (i,))
    else:
        yield path


def get(node, path):
    for p in path:
        node = node[p]
    return node


def body_key(doc: dict) -> str:
    """The part of an object that carries its content (spec, or stringData for a Secret)."""
    for key in ("spec", "stringData", "parameters"):
        if key in doc:
            return key
    return "metadata"


# Free-form string maps, where any key is legal.
MAP_KEYS = {"labels", "annotations", "requests", "limits", "rayStartParams", "matchLabels", "selector",
            "parameters", "stringData", "data", "nodeSelector"}


def struct_paths(node, path=()):
    """Paths of every mapping inside node that is a typed object, not a free-form map."""
    if isinstance(node, dict):
        if not path or path[-1] not in MAP_KEYS:
            yield path
        for k, v in node.items():
            yield from struct_paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from struct_paths(v, path + (i,))


@pytest.mark.parametrize("doc", [d for _, _, d in DOCS], ids=DOC_IDS)
def test_unknown_field_is_rejected(doc):
    """A misspelt field at the top of the body, and an unknown one in its deepest object."""
    bad = copy.deepcopy(doc)
    key = body_key(bad)
    if key in MAP_KEYS:  # stringData, parameters: any key goes inside; misspell the field itself
        bad[key + "x"] = bad.pop(key)
    else:
        first = next(iter(bad[key]))
        bad[key][first + "x"] = bad[key].pop(first)
    assert_rejected(bad)

    bad = copy.deepcopy(doc)
    deepest = max(struct_paths(bad), key=len)
    get(bad, deepest)["imagePulPolicy"] = "Always"  # a typo of a real container field
    assert_rejected(bad)


@pytest.mark.parametrize("doc", [d for _, _, d in DOCS], ids=DOC_IDS)
def test_wrong_type_is_rejected(doc):
    """The deepest scalar in the body replaced by a list (no scalar field accepts one)."""
    bad = copy.deepcopy(doc)
    body = bad[body_key(bad)]
    deepest = max(scalar_paths(body), key=len)
    get(body, deepest[:-1])[deepest[-1]] = ["not", "a", "scalar"]
    assert_rejected(bad)


def raycluster() -> dict:
    return copy.deepcopy(next(d for _, _, d in DOCS if d["kind"] == "RayCluster"))


def rayjob() -> dict:
    return copy.deepcopy(next(d for _, _, d in DOCS if d["kind"] == "RayJob"))


def _int_ray_start_param(d):
    d["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0


def _replica_typo(d):
    d["spec"]["workerGroupSpecs"][0]["replica"] = d["spec"]["workerGroupSpecs"][0].pop("replicas")


def _kuberay_17_field(d):
    d["spec"]["networkPolicy"] = {"mode": "DenyAll"}


def _auth_mode(d):
    d["spec"]["authOptions"]["mode"] = "Token"


def _container_field_typo(d):
    c = d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    c["imagePullPolices"] = c.pop("imagePullPolicy")


def _gpu_quantity_as_list(d):
    c = d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    c["resources"]["limits"]["nvidia.com/gpu"] = [8]


def _template_metadata_field(d):
    d["spec"]["headGroupSpec"]["template"]["metadata"]["uid"] = "x"


def _fs_group_as_string(d):
    d["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"]["fsGroup"] = "1000"


def _missing_template(d):
    del d["spec"]["workerGroupSpecs"][0]["template"]


def _pull_policy_value(d):
    d["spec"]["autoscalerOptions"]["imagePullPolicy"] = "always"


def _submission_mode(d):
    d["spec"]["submissionMode"] = "K8sJob"


def _ttl_as_string(d):
    d["spec"]["ttlSecondsAfterFinished"] = "600"


def _cluster_spec_typo(d):
    d["spec"]["rayClusterSpec"]["enableInTreeAutoscaler"] = True


def _submitter_container_typo(d):
    d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resource"] = {}


def _entrypoint_as_list(d):
    d["spec"]["entrypoint"] = d["spec"]["entrypoint"].split()


RAYCLUSTER_BREAKS = [_int_ray_start_param, _replica_typo, _kuberay_17_field, _auth_mode, _container_field_typo,
                     _gpu_quantity_as_list, _template_metadata_field, _fs_group_as_string, _missing_template,
                     _pull_policy_value]
RAYJOB_BREAKS = [_submission_mode, _ttl_as_string, _cluster_spec_typo, _submitter_container_typo, _entrypoint_as_list]


@pytest.mark.parametrize("load, mutate", [(raycluster, m) for m in RAYCLUSTER_BREAKS] + [(rayjob, m) for m in RAYJOB_BREAKS],
                         ids=lambda f: f.__name__.strip("_"))
def test_broken_kuberay_manifest_is_rejected(load, mutate):
    doc = load()
    validate(doc, K8S_VERSIONS[0])  # valid before the break: the break alone is what is rejected
    mutate(doc)
    assert_rejected(doc)


def test_broken_core_objects_are_rejected():
    by_kind = {d["kind"]: d for _, _, d in DOCS}
    cases = [
        ("PersistentVolumeClaim", lambda d: d["spec"].__setitem__("accessModes", "ReadWriteMany")),
        ("PersistentVolumeClaim", lambda d: d["spec"].__setitem__("storageClass", "x")),
        ("Deployment", lambda d: d["spec"].__setitem__("replicas", "2")),
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("envs", [])),
        ("StatefulSet", lambda d: d["spec"]["volumeClaimTemplates"][0]["spec"].__setitem__("accesModes", [])),
        ("Service", lambda d: d["spec"]["ports"][0].__setitem__("port", "5000x")),
        ("StorageClass", lambda d: d.__setitem__("reclaimPolicy", ["Retain"])),
        ("Secret", lambda d: d.__setitem__("stringdata", {})),
        ("Namespace", lambda d: d.__setitem__("apiVersion", "core/v1")),
    ]
    for kind, mutate in cases:
        doc = copy.deepcopy(by_kind[kind])
        validate(doc, K8S_VERSIONS[0])
        mutate(doc)
        assert_rejected(doc)
