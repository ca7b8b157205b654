"""Keeps the deployment files under infra/ valid and consistent with each other.

Pure file checks: no network, no docker engine, no Kubernetes API. Every manifest is parsed
(multi-document aware) and the fields that matter are checked; each check is a function that
raises AssertionError, and is also run against a deliberately broken copy to prove it bites.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "aws-gpu.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
MLFLOW_K8S = INFRA / "mlflow" / "k8s"
README = INFRA / "README.md"
CONSTRAINTS = ROOT / "constraints.txt"
MAKEFILE = ROOT / "Makefile"
STORAGE = KUBERAY / "storage"

SHARED_MOUNT = "/mnt/shared"
IMAGE_REPO = "ghcr.io/lorapipe/lorapipe-train"
SECRETISH = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
REQUIRED_PINS = ("torch", "ray", "deepspeed", "peft", "bitsandbytes", "transformers", "mlflow")

EXPECTED_FILES = [
    "README.md",
    "docker/Dockerfile",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml",
    "kuberay/shared-pvc.yaml",
    "kuberay/storage/aws-efs.yaml",
    "kuberay/storage/gke-filestore.yaml",
    "kuberay/storage/aks-azurefile.yaml",
    "schemas/kuberay-v1.6.yaml",
    "cluster-launcher/aws-gpu.yaml",
    "mlflow/Dockerfile",
    "mlflow/docker-compose.yaml",
    "mlflow/env.example",
    "mlflow/k8s/namespace.yaml",
    "mlflow/k8s/postgres.yaml",
    "mlflow/k8s/mlflow.yaml",
    "mlflow/k8s/secret.example.yaml",
]


# --------------------------------------------------------------------------- loading


def load_docs(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_one(path: Path) -> dict:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def k8s_docs(path: Path, kind: str) -> list[dict]:
    return [d for d in load_docs(path) if d.get("kind") == kind]


def project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1]
    m = re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE)
    assert m, "pyproject.toml: no [project] version"
    return m.group(1)


def expected_image() -> str:
    return f"{IMAGE_REPO}:{project_version()}"


def raycluster() -> dict:
    return load_one(KUBERAY / "raycluster.yaml")


def rayjob() -> dict:
    return load_one(KUBERAY / "rayjob.yaml")


def pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) for the head group and every worker group."""
    out = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    for g in cluster_spec["workerGroupSpecs"]:
        out.append((g["groupName"], g["template"]["spec"]))
    return out


def walk(node, visit):
    """Call visit(dict) on every mapping anywhere inside node."""
    if isinstance(node, dict):
        visit(node)
        for v in node.values():
            walk(v, visit)
    elif isinstance(node, list):
        for v in node:
            walk(v, visit)


def parse_pins(text: str) -> dict[str, set[str]]:
    """name -> set of versions for every `name==version` / `name[extras]==version` in text."""
    pins: dict[str, set[str]] = {}
    for m in re.finditer(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9_.-]*)(?:\[[^\]]*\])?==([0-9][^\s\"'\\]*)", text):
        pins.setdefault(m.group(1).lower(), set()).add(m.group(2))
    return pins


def dockerfile_text() -> str:
    return DOCKERFILE.read_text()


def dockerfile_instructions() -> str:
    # comments can mention versions loosely; only instructions count
    return "\n".join(line for line in dockerfile_text().splitlines() if not line.lstrip().startswith("#"))


def constraint_pins() -> dict[str, str]:
    """name -> version of every pin in constraints.txt (one version per name)."""
    body = "\n".join(line.split("#", 1)[0] for line in CONSTRAINTS.read_text().splitlines())
    pins = parse_pins(body)
    conflicting = {p: v for p, v in pins.items() if len(v) != 1}
    assert not conflicting, f"constraints.txt pins one package to several versions: {conflicting}"
    return {p: next(iter(v)) for p, v in pins.items()}


# --------------------------------------------------------------------------- checkers


def check_env_secrets(doc, where: str) -> None:
    """Every container env var that looks like a credential comes from a Secret, never a literal."""
    problems = []

    def visit(d):
        env = d.get("env")
        if not isinstance(env, list):
            return
        for e in env:
            if not isinstance(e, dict) or "name" not in e:
                continue
            if SECRETISH.search(e["name"]):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if "value" in e or not ref or not ref.get("name") or not ref.get("key"):
                    problems.append(e["name"])

    walk(doc, visit)
    assert not problems, f"{where}: credential env vars not taken from a secretKeyRef: {problems}"


def check_compose_env_secrets(compose: dict) -> None:
    """Compose credentials are ${VAR} interpolations from .env, never literals."""
    problems = []
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
        for key, value in env.items():
            interpolated = re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*(?::?[-?][^}]*)?\}", str(value))
            if SECRETISH.search(key) and value is not None and not interpolated:
                problems.append(f"{name}.{key}")
    assert not problems, f"compose: literal credentials: {problems}"


def check_compose_ports(compose: dict) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"compose {name}: port {port} not bound to 127.0.0.1"
            else:
                assert str(port).startswith("127.0.0.1:"), f"compose {name}: port {port!r} not bound to 127.0.0.1"


def check_gpu_workers(spec: dict) -> None:
    groups = spec["workerGroupSpecs"]
    assert groups, "no worker groups"
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{g['groupName']}: replica bounds"
        for c in g["template"]["spec"]["containers"]:
            res = c.get("resources") or {}
            req, lim = res.get("requests") or {}, res.get("limits") or {}
            gpus = req.get("nvidia.com/gpu")
            assert isinstance(gpus, int) and gpus > 0, f"{g['groupName']}/{c['name']}: requests no nvidia.com/gpu"
            assert lim.get("nvidia.com/gpu") == gpus, f"{g['groupName']}/{c['name']}: GPU limit != request"
            for r in ("cpu", "memory"):
                assert r in req and r in lim, f"{g['groupName']}/{c['name']}: {r} request+limit missing"


def check_head(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert "dashboard-host" in head["rayStartParams"], "head rayStartParams lack dashboard-host"
    containers = head["template"]["spec"]["containers"]
    ports = {p["containerPort"] for p in containers[0].get("ports", [])}
    assert 8265 in ports, "head does not expose the dashboard port 8265"
    for c in containers:
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            assert "nvidia.com/gpu" not in (res.get(part) or {}), "head must not take GPUs"


def check_shared_volume(spec: dict, claim: str) -> None:
    mounts = set()
    for group, pod in pod_specs(spec):
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        pvc_vols = [n for n, v in vols.items() if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim]
        assert pvc_vols, f"{group}: no volume for PVC {claim}"
        for c in pod["containers"]:
            paths = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in pvc_vols]
            assert paths, f"{group}/{c['name']}: PVC {claim} not mounted"
            mounts.update(paths)
    assert mounts == {SHARED_MOUNT}, f"shared PVC mounted at {mounts}, want {SHARED_MOUNT} everywhere"


RAY_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


def check_ray_auth(spec: dict) -> None:
    """Token auth comes from authOptions alone: KubeRay >= 1.6 sets RAY_AUTH_MODE/RAY_AUTH_TOKEN
    in every Ray container, init container, the autoscaler sidecar and the job submitter. A copy
    in autoscalerOptions.env would be a second one in the sidecar; one in a Ray container would
    override authOptions (and could name another secret)."""
    auth = spec.get("authOptions") or {}
    assert auth.get("mode") == "token", "authOptions.mode is not token"
    assert auth.get("secretName"), "authOptions.secretName missing"
    set_by_hand = [e["name"] for e in (spec.get("autoscalerOptions") or {}).get("env", [])
                   if e["name"] in RAY_AUTH_ENV]
    assert not set_by_hand, f"autoscalerOptions.env sets {set_by_hand}: the operator adds them too"
    for group, pod in pod_specs(spec):
        for c in pod["containers"] + pod.get("initContainers", []):
            set_by_hand = [e["name"] for e in c.get("env", []) if e["name"] in RAY_AUTH_ENV]
            assert not set_by_hand, f"{group}/{c['name']} sets {set_by_hand}: authOptions does that"


def all_pod_specs(which: str) -> list[tuple[str, dict]]:
    """Every pod template of raycluster.yaml or rayjob.yaml (the job's submitter included)."""
    if which == "raycluster":
        return pod_specs(raycluster()["spec"])
    spec = rayjob()["spec"]
    return pod_specs(spec["rayClusterSpec"]) + [("submitter", spec["submitterPodTemplate"]["spec"])]


def check_image_pull(pods: list[tuple[str, dict]], secret: str = "lorapipe-registry") -> None:
    """A reused tag must be pulled afresh (Always), and a private registry needs the pull secret."""
    for group, pod in pods:
        assert {"name": secret} in pod.get("imagePullSecrets", []), f"{group}: no imagePullSecrets {secret}"
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c.get("imagePullPolicy") == "Always", f"{group}/{c['name']}: imagePullPolicy is not Always"


def check_shared_storage_writable(spec: dict, uid: int = 1000) -> None:
    """Every Ray pod makes /mnt/shared writable for the image's uid: fsGroup (with
    OnRootMismatch, or kubelet re-chowns the whole share at each start) and a root init
    container that chowns the share's root and checks write access as that uid."""
    for group, pod in pod_specs(spec):
        sc = pod.get("securityContext") or {}
        assert sc.get("fsGroup") == uid, f"{group}: fsGroup != {uid}"
        assert sc.get("fsGroupChangePolicy") == "OnRootMismatch", f"{group}: fsGroupChangePolicy"
        inits = [c for c in pod.get("initContainers", [])
                 if any(m["mountPath"] == SHARED_MOUNT for m in c.get("volumeMounts", []))]
        assert inits, f"{group}: no init container prepares {SHARED_MOUNT}"
        script = " ".join(inits[0].get("command", []) + inits[0].get("args", []))
        assert (inits[0].get("securityContext") or {}).get("runAsUser") == 0, f"{group}: init step not root"
        assert f"chown {uid}:{uid} {SHARED_MOUNT}" in script, f"{group}: init step does not chown the share"
        assert f"--reuid={uid}" in script, f"{group}: init step does not check access as uid {uid}"


def launcher_schema_validate(config: dict) -> None:
    """Validate a cluster-launcher config the way `ray up` does; skip only if Ray's schema is absent."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except Exception:  # noqa: BLE001 - any import problem means: fall back to the raw schema
        prepare_config = validate_config = None
    if validate_config is not None:
        import jsonschema
        import ray.autoscaler

        schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
        jsonschema.validate(config, schema)  # the file as written
        validate_config(prepare_config(copy.deepcopy(config)))  # merged with Ray's AWS defaults
        return
    import importlib.util

    try:
        import jsonschema
    except ImportError:
        pytest.skip("neither ray.autoscaler nor jsonschema is importable: cannot validate against Ray's schema")
    spec = importlib.util.find_spec("ray")
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json" if spec and spec.origin else None
    if not schema_path or not schema_path.is_file():
        pytest.skip("ray is not installed: Ray's cluster-launcher schema (ray/autoscaler/ray-schema.json) is unavailable")
    jsonschema.validate(config, json.loads(schema_path.read_text()))


# --------------------------------------------------------------------------- all files


def test_expected_files_exist():
    missing = [f for f in EXPECTED_FILES if not (INFRA / f).is_file()]
    assert not missing, f"missing under infra/: {missing}"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path}: no YAML documents"
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is not a mapping"
        if "apiVersion" in d:
            assert d.get("kind") and (d.get("metadata") or {}).get("name"), f"{path}: k8s object without kind/name"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_no_literal_credentials_in_env(path):
    for d in load_docs(path):
        check_env_secrets(d, str(path.relative_to(INFRA)))


def test_no_credential_lookalikes_anywhere():
    patterns = {
        "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}",
        "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
        "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    }
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            for what, pat in patterns.items():
                assert not re.search(pat, text), f"{path}: looks like a real {what}"


# --------------------------------------------------------------------------- KubeRay


def test_raycluster_kind_and_groups():
    rc = raycluster()
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    check_head(rc["spec"])
    check_gpu_workers(rc["spec"])


def test_rayjob_kind_and_lifecycle():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0


def test_rayjob_cluster_spec_equals_raycluster():
    assert rayjob()["spec"]["rayClusterSpec"] == raycluster()["spec"], (
        "rayjob.yaml rayClusterSpec drifted from raycluster.yaml spec")


def test_rayjob_entrypoint_runs_pipeline_on_an_existing_config():
    entry = rayjob()["spec"]["entrypoint"].split()
    assert entry[:2] == ["lorapipe", "pipeline"] and entry[2].startswith("configs/"), entry
    assert (ROOT / entry[2]).is_file(), f"entrypoint config {entry[2]} does not exist in the repository"
    overrides = dict(a.split("=", 1) for a in entry[3:])
    assert overrides.get("run.storage_path", "").startswith(SHARED_MOUNT + "/"), (
        "the job's run.storage_path must be on the shared PVC")
    for key in ("run.storage_path", "run.output_dir"):
        if key in overrides and not overrides[key].startswith("s3://"):
            assert overrides[key].startswith(SHARED_MOUNT + "/"), f"{key} not on the shared mount"


def test_preset_paths_are_on_shared_storage():
    cfg = yaml.safe_load((ROOT / rayjob()["spec"]["entrypoint"].split()[2]).read_text())
    for key in ("storage_path", "output_dir"):
        value = (cfg.get("run") or {}).get(key)
        if value and "://" not in value and Path(value).is_absolute():
            assert value.startswith(SHARED_MOUNT + "/"), f"preset run.{key}={value} is not under {SHARED_MOUNT}"


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_images_equal_everywhere(which):
    spec = raycluster()["spec"] if which == "raycluster" else rayjob()["spec"]["rayClusterSpec"]
    images = {c["image"] for _, pod in pod_specs(spec) for c in pod["containers"]}
    assert images == {expected_image()}, f"{which}: images {images}, want {expected_image()}"


def test_image_tag_documented_in_dockerfile_and_readme():
    img = expected_image()
    assert f"-t {img}" in dockerfile_text(), "Dockerfile build comment names another tag"
    readme = README.read_text()
    assert f"docker build -f infra/docker/Dockerfile -t {img} ." in readme
    assert f"docker push {img}" in readme


RWX_PROVISIONERS = {"efs.csi.aws.com", "filestore.csi.storage.gke.io", "file.csi.azure.com"}


def test_shared_pvc_is_rwx_and_mounted_everywhere():
    pvc = load_one(KUBERAY / "shared-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = pvc["metadata"]["name"]
    check_shared_volume(raycluster()["spec"], claim)
    check_shared_volume(rayjob()["spec"]["rayClusterSpec"], claim)


def test_ray_token_auth_and_secrets():
    spec = raycluster()["spec"]
    check_ray_auth(spec)
    check_ray_auth(rayjob()["spec"]["rayClusterSpec"])
    for group, pod in pod_specs(spec):
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert "secretKeyRef" in (env["HF_TOKEN"].get("valueFrom") or {}), f"{group}: HF_TOKEN not from a Secret"


def test_ray_pods_point_at_the_k8s_mlflow_service():
    svc = next(d for d in k8s_docs(MLFLOW_K8S / "mlflow.yaml", "Service"))
    port = svc["spec"]["ports"][0]["port"]
    want = f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port}"
    for group, pod in pod_specs(raycluster()["spec"]):
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI") == want, f"{group}: MLFLOW_TRACKING_URI != {want}"


def test_ray_version_matches_constraints_pin():
    assert constraint_pins()["ray"] == raycluster()["spec"]["rayVersion"]


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_images_pulled_fresh_with_pull_secret(which):
    check_image_pull(all_pod_specs(which))
    spec = raycluster()["spec"] if which == "raycluster" else rayjob()["spec"]["rayClusterSpec"]
    assert spec["autoscalerOptions"].get("imagePullPolicy") == "Always", "autoscaler sidecar pulls stale images"


def test_submitter_runs_the_cluster_image():
    spec = rayjob()["spec"]
    (c,) = spec["submitterPodTemplate"]["spec"]["containers"]
    assert c["image"] == expected_image() and "command" not in c, "the operator fills in the submit command"
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_shared_storage_made_writable(which):
    spec = raycluster()["spec"] if which == "raycluster" else rayjob()["spec"]["rayClusterSpec"]
    check_shared_storage_writable(spec)


def test_manifests_name_the_operator_version_the_schema_follows():
    """The operator version in the manifests' headers and the README is the one whose CRD the
    schema follows (infra/schemas/kuberay-v<version>.yaml)."""
    (schema,) = (INFRA / "schemas").glob("kuberay-v*.yaml")
    version = re.fullmatch(r"kuberay-v(\d+\.\d+)\.yaml", schema.name).group(1)
    for path in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml", README):
        found = set(re.findall(r"KubeRay operator >= (\d+\.\d+)", path.read_text()))
        assert found == {version}, f"{path.name}: names KubeRay operator >= {found}, schema follows {version}"


def test_shared_pvc_names_a_shipped_rwx_storage_class():
    """The claim never falls back to the cluster's default (ReadWriteOnce) class: it names a
    class that each file under kuberay/storage/ defines, one per cloud, all RWX-capable."""
    cls = load_one(KUBERAY / "shared-pvc.yaml")["spec"].get("storageClassName")
    assert cls, "shared-pvc.yaml sets no storageClassName: the default class is ReadWriteOnce on EKS/GKE/AKS"
    classes = {p.name: load_one(p) for p in STORAGE.glob("*.yaml")}
    assert len(classes) >= 3, classes
    for name, sc in classes.items():
        assert sc["kind"] == "StorageClass" and sc["metadata"]["name"] == cls, f"{name}: not StorageClass {cls}"
        assert sc["provisioner"] in RWX_PROVISIONERS, f"{name}: {sc['provisioner']} is not a known RWX provisioner"
        assert sc.get("reclaimPolicy") == "Retain", f"{name}: checkpoints would go with the claim"
    assert {c["provisioner"] for c in classes.values()} == RWX_PROVISIONERS
    readme = README.read_text()
    for name in classes:
        assert f"infra/kuberay/storage/{name}" in readme, f"README does not name storage/{name}"


# negative controls: the checkers catch broken manifests


def test_checkers_catch_broken_raycluster():
    good = raycluster()["spec"]

    bad = copy.deepcopy(good)
    del bad["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]
    with pytest.raises(AssertionError):
        check_gpu_workers(bad)

    bad = copy.deepcopy(good)
    bad["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] = "/data"
    with pytest.raises(AssertionError):
        check_shared_volume(bad, "lorapipe-shared")

    bad = copy.deepcopy(good)
    bad["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": 6379}]
    with pytest.raises(AssertionError):
        check_head(bad)

    bad = copy.deepcopy(good)
    env = bad["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "HF_TOKEN", "value": "literal"})
    with pytest.raises(AssertionError):
        check_env_secrets(bad, "mutated")

    bad = copy.deepcopy(good)
    bad["authOptions"]["mode"] = "disabled"
    with pytest.raises(AssertionError):
        check_ray_auth(bad)

    token = {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "other", "key": "auth_token"}}}
    bad = copy.deepcopy(good)
    bad["autoscalerOptions"]["env"] = [token]
    with pytest.raises(AssertionError):
        check_ray_auth(bad)
    bad = copy.deepcopy(good)
    bad["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"].append(token)
    with pytest.raises(AssertionError):
        check_ray_auth(bad)

    bad = copy.deepcopy(good)
    bad["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "IfNotPresent"
    with pytest.raises(AssertionError):
        check_image_pull(pod_specs(bad))
    bad = copy.deepcopy(good)
    del bad["workerGroupSpecs"][0]["template"]["spec"]["imagePullSecrets"]
    with pytest.raises(AssertionError):
        check_image_pull(pod_specs(bad))

    bad = copy.deepcopy(good)
    del bad["workerGroupSpecs"][0]["template"]["spec"]["securityContext"]["fsGroup"]
    with pytest.raises(AssertionError):
        check_shared_storage_writable(bad)
    bad = copy.deepcopy(good)
    del bad["headGroupSpec"]["template"]["spec"]["initContainers"]
    with pytest.raises(AssertionError):
        check_shared_storage_writable(bad)


# --------------------------------------------------------------------------- Dockerfile


def test_constraints_pin_every_key_package_once():
    pins = constraint_pins()
    missing = [p for p in REQUIRED_PINS if p not in pins]
    assert not missing, f"constraints.txt does not pin: {missing}"


def test_constraints_are_what_this_environment_runs():
    """The suite runs the supported combination: every pinned package that is installed here
    has the pinned version (a local label such as +cpu aside)."""
    from importlib.metadata import PackageNotFoundError, version

    wrong = {}
    for name, pinned in constraint_pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        if installed.split("+", 1)[0] != pinned:
            wrong[name] = f"installed {installed}, constraints.txt {pinned}"
    assert not wrong, f"not the supported combination: {wrong}"


def test_dockerfile_takes_every_version_from_constraints():
    body = dockerfile_instructions()
    assert not parse_pins(body), f"Dockerfile pins versions itself: {parse_pins(body)}; use constraints.txt"
    m = re.search(r"^COPY\s+(?:--\S+\s+)*constraints\.txt\s+(\S+)$", body, re.MULTILINE)
    assert m, "Dockerfile does not copy constraints.txt"
    assert re.search(rf"^ENV PIP_CONSTRAINT={re.escape(m.group(1))}$", body, re.MULTILINE), (
        "constraints.txt is not in force (PIP_CONSTRAINT) in the image")
    # in force before the first package install
    assert body.index("PIP_CONSTRAINT") < body.index("pip install --index-url"), "torch installed before the constraints"


def test_dockerfile_import_check_uses_the_installed_package():
    """Run from /app (the WORKDIR holding lora/ and pipelines/), `import lora` would find the
    source folders and prove nothing about the installed package."""
    body = dockerfile_instructions()
    run = next(r for r in body.split("\nRUN ") if "import lora, pipelines" in r)
    before = run[: run.index("import lora, pipelines")]
    assert re.search(r"\bcd /(\s|&|;|$)", before), "the import check runs in the source tree"


def test_makefile_installs_under_the_constraints():
    """`make install` uses the same pins as the image: every package install passes
    -c constraints.txt, and its CPU torch default is the pinned torch."""
    text = MAKEFILE.read_text()
    installs = [line for line in text.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    torch_ver = re.search(r"^TORCH_VER\s*\?=\s*(\S+)$", text, re.MULTILINE).group(1)
    assert torch_ver == constraint_pins()["torch"], f"Makefile TORCH_VER {torch_ver} != constraints.txt torch"
    assert re.search(r"^\$\(STAMP\):.*\bconstraints\.txt\b", text, re.MULTILINE), "a new pin would not reinstall"


def test_dockerfile_base_python_user_workdir():
    text = dockerfile_text()
    instr = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    frm = [line for line in instr if line.upper().startswith("FROM ")]
    m = re.fullmatch(r"FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu\d+\.\d+", frm[0])
    assert m, f"unexpected base image: {frm[0]}"
    # torch comes from the PyTorch index for the base image's CUDA version, which is 12.x
    # (the cluster launcher's AMI and the README are written for it)
    assert f"download.pytorch.org/whl/cu{m.group(1)}{m.group(2)}" in text, "torch index does not match the CUDA base"
    assert m.group(1) == "12", f"CUDA {m.group(1)}.{m.group(2)}: the AMI and README assume CUDA 12.x"
    assert "python3.11" in text
    users = [line.split(None, 1)[1] for line in instr if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    workdirs = [line.split(None, 1)[1] for line in instr if line.upper().startswith("WORKDIR ")]
    assert workdirs and workdirs[-1] == "/app"
    assert not any(line.upper().startswith("ENTRYPOINT") for line in instr), "no ENTRYPOINT: Ray runs its own commands"
    assert re.search(r"pip install[^\n]* \.(\s|$)", text), "the project itself is not installed"


def test_dockerfile_copies_only_existing_project_paths():
    sources = []
    for line in dockerfile_text().splitlines():
        if line.strip().upper().startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            sources += parts[:-1]
    assert set(sources) >= {"pyproject.toml", "README.md", "lora", "pipelines", "configs", "constraints.txt"}
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"Dockerfile COPYs paths that do not exist: {missing}"


def test_pin_parser_catches_unpinned():
    assert "mlflow" not in parse_pins("RUN pip install mlflow ray==2.1.0")
    assert parse_pins('pip install "ray[default,train]==2.60.0"')["ray"] == {"2.60.0"}


# --------------------------------------------------------------------------- cluster launcher


def launcher() -> dict:
    return load_one(LAUNCHER)


def test_launcher_validates_against_ray_schema():
    launcher_schema_validate(launcher())


def test_launcher_schema_rejects_broken_config():
    import jsonschema

    bad = copy.deepcopy(launcher())
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "8"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        launcher_schema_validate(bad)
    bad = copy.deepcopy(launcher())
    bad["docker"]["gpus"] = "all"  # not a docker option Ray knows
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        launcher_schema_validate(bad)


def test_launcher_pins_an_ami_on_every_node_type():
    """Without ImageId Ray 2.60 uses its hard-coded Ubuntu 18.04 / CUDA 11.2 Deep Learning AMI."""
    c = launcher()
    for name, t in c["available_node_types"].items():
        ami = t["node_config"].get("ImageId", "")
        assert re.fullmatch(r"ami-[0-9a-f]{17}", ami), f"{name}: ImageId {ami!r} is not a pinned AMI id"
    text = LAUNCHER.read_text()
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in text, "the AMI's origin (and how to refresh it) is not documented"


def test_launcher_nodes_image_and_dashboard():
    c = launcher()
    assert c["provider"]["type"] == "aws" and c["provider"]["region"] == "us-east-1"
    assert c["auth"]["ssh_user"] == "ubuntu"
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert "CPU" in head["resources"] and head["resources"].get("GPU", 0) == 0
    workers = [t for n, t in types.items() if n != c["head_node_type"]]
    assert any(t["resources"].get("GPU") == 8 and t["resources"].get("CPU", 0) > 0 for t in workers)
    for t in workers:
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= c["max_workers"]

    docker = c["docker"]
    assert docker["image"] == expected_image()
    assert "--gpus all" in docker.get("worker_run_options", [])
    assert not any("--gpus" in o for o in docker.get("run_options", []) + docker.get("head_run_options", []))
    assert any(re.search(r"--shm-size", o) for o in docker.get("worker_run_options", []) + docker.get("run_options", []))
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in docker.get("run_options", []), "shared storage not mounted"

    head_cmds = " ".join(c["head_start_ray_commands"])
    assert "ray start --head" in head_cmds
    assert re.search(r"--dashboard-host[ =]127\.0\.0\.1\b", head_cmds), "dashboard must listen on loopback only"
    assert "0.0.0.0" not in head_cmds
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(c["worker_start_ray_commands"])
    assert c["file_mounts"].get("/app") == ".", "the repository is not synced to the image's WORKDIR"


# --------------------------------------------------------------------------- MLflow (compose)


def compose() -> dict:
    return load_one(COMPOSE)


def test_compose_ports_loopback_only():
    check_compose_ports(compose())


def test_compose_credentials_from_env_file():
    c = compose()
    check_compose_env_secrets(c)
    body = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", body))
    assert used, "compose interpolates no variables from .env"
    example = INFRA / "mlflow" / "env.example"
    defined = {}
    for line in example.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            defined[k.strip()] = v.strip()
    assert used <= set(defined), f"env.example lacks {used - set(defined)}"
    for k, v in defined.items():
        if SECRETISH.search(k):
            assert "CHANGE_ME" in v, f"env.example: {k} must be a CHANGE_ME placeholder"


def test_compose_mlflow_server_command():
    c = compose()
    svc = c["services"]["mlflow"]
    cmd = svc["command"] if isinstance(svc["command"], str) else " ".join(svc["command"])
    assert cmd.startswith("mlflow server")
    assert re.search(r"--backend-store-uri postgresql://\S+@postgres:5432/", cmd)
    m = re.search(r"--artifacts-destination s3://([a-z0-9.-]+)", cmd)
    assert m, "artifacts are not on S3"
    assert "--serve-artifacts" in cmd and "--host 0.0.0.0" in cmd and "--port 5000" in cmd
    assert "127.0.0.1:5000:5000" in svc["ports"]
    assert svc["environment"]["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio:")
    assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["depends_on"]["createbuckets"]["condition"] == "service_completed_successfully"
    # the one-shot creates exactly the bucket the server writes to
    mb = " ".join(c["services"]["createbuckets"]["command"])
    assert f"mc mb --ignore-existing local/{m.group(1)}" in mb


def test_compose_postgres_and_minio():
    s = compose()["services"]
    assert s["postgres"]["image"] == "postgres:16"
    assert "healthcheck" in s["postgres"] and s["postgres"]["volumes"]
    assert s["minio"]["image"].startswith("minio/minio:") and "healthcheck" in s["minio"]
    assert s["createbuckets"]["image"].startswith("minio/mc:")


def test_mlflow_server_version_matches_client_pin():
    client = constraint_pins()["mlflow"]
    server_df = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert re.search(rf"^FROM ghcr\.io/mlflow/mlflow:v{re.escape(client)}$", server_df, re.MULTILINE)
    assert compose()["services"]["mlflow"]["image"].endswith(f":{client}")
    dep = k8s_docs(MLFLOW_K8S / "mlflow.yaml", "Deployment")[0]
    for c in dep["spec"]["template"]["spec"]["containers"]:
        assert c["image"].endswith(f":{client}")
    assert re.search(rf"\bboto3=={re.escape(constraint_pins()['boto3'])}\b", server_df), "server boto3 != constraints"


def test_compose_checkers_catch_breakage():
    bad = copy.deepcopy(compose())
    bad["services"]["mlflow"]["ports"] = ["5000:5000"]
    with pytest.raises(AssertionError):
        check_compose_ports(bad)
    bad = copy.deepcopy(compose())
    bad["services"]["mlflow"]["environment"]["AWS_SECRET_ACCESS_KEY"] = "minio123"
    with pytest.raises(AssertionError):
        check_compose_env_secrets(bad)


# --------------------------------------------------------------------------- MLflow (k8s)


def test_k8s_mlflow_objects_in_namespace():
    ns = load_one(MLFLOW_K8S / "namespace.yaml")
    assert ns["kind"] == "Namespace" and ns["metadata"]["name"] == "mlflow"
    for path in MLFLOW_K8S.glob("*.yaml"):
        for d in load_docs(path):
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == "mlflow", f"{path.name}: {d['kind']} outside mlflow"


def test_k8s_mlflow_deployment_probes_resources_and_args():
    dep = k8s_docs(MLFLOW_K8S / "mlflow.yaml", "Deployment")[0]
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", f"{probe} path"
        assert ports.get(get["port"], get["port"]) == 5000, f"{probe} port"
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part]), f"resources.{part}"
    args = " ".join(c["args"])
    assert "--backend-store-uri postgresql://" in args and "--artifacts-destination s3://" in args
    # MLflow rejects unknown Host headers: the in-cluster service name must be allowed
    hosts = c["args"][c["args"].index("--allowed-hosts") + 1].split(",")
    assert "mlflow.mlflow.svc.cluster.local:5000" in hosts


def test_k8s_mlflow_service():
    svc = k8s_docs(MLFLOW_K8S / "mlflow.yaml", "Service")[0]
    dep = k8s_docs(MLFLOW_K8S / "mlflow.yaml", "Deployment")[0]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert svc["spec"]["ports"][0]["port"] == 5000
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_postgres_statefulset():
    (sts,) = k8s_docs(MLFLOW_K8S / "postgres.yaml", "StatefulSet")
    (svc,) = k8s_docs(MLFLOW_K8S / "postgres.yaml", "Service")
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert sts["spec"]["volumeClaimTemplates"]
    assert "readinessProbe" in sts["spec"]["template"]["spec"]["containers"][0]


def test_k8s_secret_refs_exist_in_template_with_placeholders_only():
    provided = {}
    for s in k8s_docs(MLFLOW_K8S / "secret.example.yaml", "Secret"):
        data = s.get("stringData") or {}
        provided[s["metadata"]["name"]] = set(data)
        for k, v in data.items():
            if SECRETISH.search(k) or k == "MLFLOW_S3_ENDPOINT_URL":
                assert "CHANGE_ME" in str(v), f"secret.example.yaml: {k} holds a value, not a placeholder"
        assert "data" not in s, "secret.example.yaml must not carry base64 data"
    refs = []
    for path in (MLFLOW_K8S / "mlflow.yaml", MLFLOW_K8S / "postgres.yaml"):
        def visit(d):
            ref = d.get("secretKeyRef")
            if isinstance(ref, dict) and not ref.get("optional"):
                refs.append((ref["name"], ref["key"]))
        for d in load_docs(path):
            walk(d, visit)
    assert refs
    missing = [r for r in refs if r[1] not in provided.get(r[0], set())]
    assert not missing, f"secretKeyRefs not in secret.example.yaml: {missing}"


def test_k8s_secret_template_leaves_optional_keys_out():
    """An optional key present in the template is used, placeholder and all: applied as is on
    AWS, MLFLOW_S3_ENDPOINT_URL: CHANGE_ME would become the S3 endpoint."""
    optional = []
    for path in (MLFLOW_K8S / "mlflow.yaml", MLFLOW_K8S / "postgres.yaml"):
        def visit(d):
            ref = d.get("secretKeyRef")
            if isinstance(ref, dict) and ref.get("optional"):
                optional.append((ref["name"], ref["key"]))
        for d in load_docs(path):
            walk(d, visit)
    assert ("mlflow-s3", "MLFLOW_S3_ENDPOINT_URL") in optional
    for s in k8s_docs(MLFLOW_K8S / "secret.example.yaml", "Secret"):
        present = [k for name, k in optional if name == s["metadata"]["name"] and k in (s.get("stringData") or {})]
        assert not present, f"secret.example.yaml {s['metadata']['name']}: optional keys {present} would be used as is"


# --------------------------------------------------------------------------- README


def test_readme_documents_the_steps():
    text = README.read_text()
    head_svc = f"{raycluster()['metadata']['name']}-head-svc"
    for needle in (
        f"kubectl -n lorapipe port-forward svc/{head_svc} 8265:8265",
        "export RAY_AUTH_MODE=token",
        "export RAY_AUTH_TOKEN=",
        "lorapipe submit configs/llama3-8b-qlora-zero3.yaml --address http://127.0.0.1:8265 --command pipeline",
        "kubectl -n lorapipe apply -f infra/kuberay/rayjob.yaml",
        "ray up -y infra/cluster-launcher/aws-gpu.yaml",
        "ray dashboard infra/cluster-launcher/aws-gpu.yaml",
        "docker compose --env-file .env up -d",
        "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000",
        "run.storage_path",
    ):
        assert needle in text, f"infra/README.md lacks: {needle}"


def test_readme_paths_and_configs_exist():
    text = README.read_text()
    for p in set(re.findall(r"infra/[\w./-]+[\w]", text)):
        assert (ROOT / p).exists(), f"README names {p}, which does not exist"
    for p in set(re.findall(r"configs/[\w./-]+\.yaml", text)):
        assert (ROOT / p).is_file(), f"README names {p}, which does not exist"
