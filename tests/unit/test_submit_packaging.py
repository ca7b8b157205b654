"""`lorapipe submit` without a cluster: what is packaged, the size refusal, what reaches the job's
environment and what is printed, entrypoint quoting, where outputs go. No Ray cluster is started."""
from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import pytest

from pipelines.cluster import submit as sub
from pipelines.core.errors import UserError

SECRET = "hf_do_not_print_me_123"


def _touch(root: Path, rel: str, text: str = "x") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


@pytest.fixture
def project(tmp_path, repo_root) -> Path:
    """A small project tree: code, a config, and everything a real checkout accumulates."""
    root = tmp_path / "proj"
    for rel in ["pyproject.toml", "pipelines/__init__.py", "pipelines/cli.py", "lora/__init__.py", "README.md",
                "sub/keep.txt", "sub/secret.txt", "big/blob.bin",
                # left out:
                ".venv/lib/site.py", "runs/r1/adapter.safetensors", "mlruns/0/meta.yaml", "mlartifacts/a",
                "mlflow.db", "nested/cache.db", ".git/HEAD", "pipelines/__pycache__/cli.cpython-311.pyc",
                "bench/results/run.json", ".whl/torch.whl", "dist/x-1.0.whl", ".gl/x",
                ".lorapipe/tiny/model.safetensors",
                ".demo/runs/x", ".cache/huggingface/x", "lorapipe.egg-info/PKG-INFO", ".local-only/x"]:
        _touch(root, rel)
    _touch(root, "sub/.gitignore", "secret.txt\n")
    _touch(root, ".rayignore", "big\n")
    _touch(root, ".git/info/exclude", "# local\n/.local-only/\n")
    (root / "configs").mkdir()
    shutil.copy(repo_root / "configs" / "tiny-cpu.yaml", root / "configs" / "tiny-cpu.yaml")
    return root


def test_packaged_files_leave_out_envs_outputs_caches_and_ignored(project):
    files = sub.packaged_files(project, sub.package_excludes(project))
    assert set(files) == {"pyproject.toml", "pipelines/__init__.py", "pipelines/cli.py", "lora/__init__.py",
                          "README.md", "sub/keep.txt", "sub/.gitignore", ".rayignore", "configs/tiny-cpu.yaml"}
    more = sub.packaged_files(project, sub.package_excludes(project, ("README.md", "sub")))
    assert "README.md" not in more and not any(f.startswith("sub/") for f in more)


def test_package_limit_is_rays_upload_limit():
    from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    # The dashboard answers HTTP 413 above its body limit, before the GCS package limit applies.
    assert sub.package_limit_bytes() == min(DASHBOARD_CLIENT_MAX_SIZE, GCS_STORAGE_MAX_SIZE) == 100 * 2**20


def test_oversized_working_dir_is_refused_naming_the_biggest(project):
    (project / "data").mkdir()
    with open(project / "data" / "huge.parquet", "wb") as f:
        f.truncate(150 * 2**20)  # sparse: no disk used
    _touch(project, "weights.bin", "w" * 2_000_000)
    files = sub.packaged_files(project, sub.package_excludes(project))
    with pytest.raises(UserError) as e:
        sub.check_package_size(files, project, sub.package_limit_bytes())
    msg = str(e.value)
    assert "\n" not in msg and "150.0 MiB" in msg and "100.0 MiB upload limit" in msg
    assert msg.index("data/ 150.0 MiB") < msg.index("weights.bin 1.9 MiB")
    assert sub.check_package_size({"a.py": 10}, project, sub.package_limit_bytes()) > 10


def test_forwarded_env_by_name_only():
    environ = {"HF_TOKEN": SECRET, "MLFLOW_TRACKING_URI": "http://mlflow:5000", "LORAPIPE_HOME": "/h",
               "AWS_SECRET_ACCESS_KEY": "aws-secret", "UNRELATED": "x", "HUGGING_FACE_HUB_TOKEN": ""}
    env = sub.forwarded_env(environ, ("AWS_SECRET_ACCESS_KEY", "NOT_SET_HERE"))
    assert env == {"HF_TOKEN": SECRET, "MLFLOW_TRACKING_URI": "http://mlflow:5000", "LORAPIPE_HOME": "/h",
                   "AWS_SECRET_ACCESS_KEY": "aws-secret"}
    with pytest.raises(UserError) as e:
        sub.forwarded_env(environ, (f"HF_TOKEN={SECRET}",))
    assert SECRET not in str(e.value) and "names only" in str(e.value)


def test_override_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(UserError) as e:
        sub.check_overrides_publishable(["train.lr=1e-4", "mlflow.tracking_uri=http://bob:s3cr3t@mlflow:5000"])
    assert "s3cr3t" not in str(e.value) and "mlflow.tracking_uri" in str(e.value)
    sub.check_overrides_publishable(["model.shape.num_key_value_heads=8", "mlflow.tracking_uri=http://mlflow:5000"])


def test_entrypoint_quotes_every_argument():
    overrides = ["data.path=my data/set.jsonl", "name=it's", "lora.target_modules=[q_proj, v_proj]", "x=$(rm -rf ~)"]
    line = sub.entrypoint("train", "configs/my cfg.yaml", overrides)
    assert shlex.split(line) == [*sub.JOB_ENTRY, "train", "--no-progress", "configs/my cfg.yaml", *overrides]


def test_config_must_be_inside_the_project(project, tmp_path):
    assert sub.config_in_project(str(project / "configs" / "tiny-cpu.yaml"), project) == "configs/tiny-cpu.yaml"
    _touch(tmp_path, "elsewhere.yaml", "name: x\n")
    with pytest.raises(UserError, match="outside the project"):
        sub.config_in_project(str(tmp_path / "elsewhere.yaml"), project)
    with pytest.raises(UserError, match="not found"):
        sub.config_in_project(str(project / "configs" / "nope.yaml"), project)


def test_placement_pins_outputs_only_when_the_head_is_this_machine(project, monkeypatch):
    monkeypatch.chdir(project)
    base = {"name": "x", "output_dir": "runs", "storage_path": None, "tracking_uri": None, "mlflow_enabled": True,
            "builtin": True}
    place = sub.durable_placement(base, project, local=True, environ={})
    assert place.overrides == [f"run.output_dir={project / 'runs'}",
                               f"mlflow.tracking_uri=sqlite:///{project / 'mlflow.db'}"]
    assert place.env == {"LORAPIPE_HOME": str((project / ".lorapipe").resolve())} and place.warnings == []
    place = sub.durable_placement({**base, "output_dir": "/mnt/shared/runs", "storage_path": "ckpt", "builtin": False},
                                  project, local=True, environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert place.overrides == [f"run.storage_path={project / 'ckpt'}"] and place.env == {}
    place = sub.durable_placement({**base, "tracking_uri": "sqlite:///m.db"}, project, local=True,
                                  environ={"LORAPIPE_HOME": "home"})
    assert f"mlflow.tracking_uri=sqlite:///{project / 'm.db'}" in place.overrides
    assert place.env == {"LORAPIPE_HOME": str((project / "home").resolve())}

    place = sub.durable_placement(base, project, local=False, environ={})
    assert place.overrides == [] and place.env == {} and len(place.warnings) == 3
    assert "temporary copy" in place.warnings[0] and "run.storage_path=runs/_ray" in place.warnings[0]
    assert "MLflow" in place.warnings[1] and "LORAPIPE_HOME" in place.warnings[2]
    place = sub.durable_placement({**base, "output_dir": "/mnt/shared/runs", "builtin": False}, project, local=False,
                                  environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert len(place.warnings) == 1 and "shared storage every node sees" in place.warnings[0]


def test_a_local_package_shadowing_an_installed_one_is_reported(project):
    _touch(project, "datasets/__init__.py")      # shadows the installed `datasets` inside the job
    _touch(project, "yaml.py")                   # and this shadows PyYAML
    _touch(project, "mydata/train.jsonl")         # plain data folders shadow nothing
    files = sub.packaged_files(project, sub.package_excludes(project))
    assert sub.shadowing_modules(files, project) == ["datasets", "yaml"]


class FakeClient:
    def __init__(self):
        self.submitted = {}

    def get_address(self):
        return "http://127.0.0.1:8265"

    def submit_job(self, **kw):
        self.submitted = kw
        return "raysubmit_fake"


def _submit(monkeypatch, project, *argv, local=True):
    from pipelines import cli
    from pipelines.cluster import jobs

    client = FakeClient()
    monkeypatch.chdir(project)
    monkeypatch.setattr(jobs, "connect", lambda address: client)
    monkeypatch.setattr(jobs, "head_is_this_machine", lambda address: local)
    rc = cli.main(["submit", "configs/tiny-cpu.yaml", *argv])
    return rc, client


def test_submit_passes_secrets_to_the_job_but_never_prints_them(monkeypatch, capsys, project):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:pw-in-uri@mlflow:5000")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-token-value")
    rc, client = _submit(monkeypatch, project, "train.max_steps=6", "train.eval_every=3", "--command", "train")
    out = capsys.readouterr()
    printed = out.out + out.err
    assert rc == 0, printed
    env = client.submitted["runtime_env"]["env_vars"]
    assert env["HF_TOKEN"] == SECRET and env["MLFLOW_TRACKING_URI"].endswith("@mlflow:5000")
    assert "RAY_AUTH_TOKEN" not in env  # the cluster has its own; never ship ours
    for value in (SECRET, "pw-in-uri", "ray-token-value"):
        assert value not in printed and value not in str(client.submitted["metadata"])
        assert value not in client.submitted["entrypoint"]
    assert "HF_TOKEN" in printed and "MLFLOW_TRACKING_URI" in printed
    meta = client.submitted["metadata"]
    assert meta["lorapipe.config"] == "tiny-cpu" and meta["lorapipe.command"] == "train" and meta["lorapipe.user"]
    assert all(isinstance(v, str) for v in meta.values())
    assert client.submitted["runtime_env"]["working_dir"] == str(project.resolve())
    assert "lorapipe jobs logs raysubmit_fake --follow --address http://127.0.0.1:8265" in printed
    # Local head, MLFLOW_TRACKING_URI set: outputs and builtin assets pinned to the project, MLflow left to the env.
    args = shlex.split(client.submitted["entrypoint"])
    assert args[:6] == [*sub.JOB_ENTRY, "train", "--no-progress", "configs/tiny-cpu.yaml"]
    assert f"run.output_dir={project.resolve() / 'runs'}" in args
    assert not any(a.startswith("mlflow.tracking_uri=") for a in args)
    assert env["LORAPIPE_HOME"] == os.environ["LORAPIPE_HOME"]  # set here (tests/conftest.py): kept


def test_submit_to_a_remote_head_leaves_paths_and_warns(monkeypatch, capsys, project):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, client = _submit(monkeypatch, project, local=False)
    err = capsys.readouterr().err
    assert rc == 0
    assert shlex.split(client.submitted["entrypoint"])[6:] == []
    assert "warning: run.output_dir=runs" in err and "temporary copy" in err


def test_bad_config_is_refused_before_contacting_the_cluster(monkeypatch, capsys, project):
    from pipelines import cli
    from pipelines.cluster import jobs

    def no_cluster(address):
        raise AssertionError("must not contact the cluster")

    monkeypatch.chdir(project)
    monkeypatch.setattr(jobs, "connect", no_cluster)
    rc = cli.main(["submit", "configs/tiny-cpu.yaml", "train.max_stepz=5", "--address", "http://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "train.max_stepz" in err and "train.max_steps" in err


def test_tune_needs_a_tune_section(monkeypatch, capsys, project):
    rc, client = _submit(monkeypatch, project, "--command", "tune")
    assert rc == 2 and "no tune: section" in capsys.readouterr().err and not client.submitted


def test_no_validate_submits_a_bad_config_as_is(monkeypatch, project):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, client = _submit(monkeypatch, project, "train.max_stepz=5", "--no-validate")
    assert rc == 0 and "train.max_stepz=5" in shlex.split(client.submitted["entrypoint"])
    assert client.submitted["metadata"]["lorapipe.config"] == "tiny-cpu"


@pytest.mark.parametrize("address,message", [
    (None, "no cluster address"),
    ("ray://head:10001", "not a dashboard address"),
    ("tcp://head:8265", "must be http"),
])
def test_bad_addresses_are_one_line_errors(monkeypatch, address, message):
    from pipelines.cluster.jobs import dashboard_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UserError, match=message):
        dashboard_address(address)


def test_ray_address_stands_in_for_address(monkeypatch):
    from pipelines.cluster.jobs import dashboard_address, is_loopback

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:8265/")
    assert dashboard_address(None) == "http://127.0.0.1:8265"
    assert dashboard_address("https://ray.example.com") == "https://ray.example.com"
    assert is_loopback("http://localhost:8265") and is_loopback("http://127.0.0.2:1")
    assert not is_loopback("http://10.0.0.5:8265")


def test_options_may_sit_between_config_and_overrides():
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["submit", "configs/tiny-cpu.yaml", "--address", "http://h:8265", "a=1",
                                      "--follow", "b=2", "--env", "AWS_PROFILE", "c=3"])
    assert (args.config, args.overrides, args.address, args.follow, args.env) == \
        ("configs/tiny-cpu.yaml", ["a=1", "b=2", "c=3"], "http://h:8265", True, ["AWS_PROFILE"])


def test_job_entry_without_lorapipes_python_fails_in_one_line(tmp_path):
    """A cluster node whose Pythons lack lorapipe's dependencies: the job fails with exit 2 and one
    line naming what each candidate lacks (the found case runs in tests/integration/test_submit.py,
    whose head has the venv off PATH)."""
    import subprocess

    script = Path(sub.__file__).with_name("job_entry.sh")
    # No exec: the script's parent is this `sh`, which has no Ray loaded, like a bare node.
    out = subprocess.run(["/bin/sh", "-c", f"sh {script} train --no-progress configs/tiny-cpu.yaml"],
                         env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorapipe: error: no Python on this cluster node")
    assert "python3 (lacks" in lines[0] or "python3 (not found)" in lines[0]
