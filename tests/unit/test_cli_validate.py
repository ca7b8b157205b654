"""`lorapipe validate` as a user runs it: resolved YAML + global batch on success; exactly one
line on stderr and exit status 2 on bad input, never a traceback.

The three headline cases run the real console script as subprocesses (started together, since
each one pays the interpreter + torch import); the rest call `pipelines.cli.main` in-process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config.load import config_from_yaml_text, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/tiny-cpu.yaml"

SUBPROCESS_CASES = {
    "ok": ("validate", TINY),
    "typo": ("validate", TINY, "lora.rr=3"),
    "missing": ("validate", "configs/does-not-exist.yaml"),
    "tune_typo": ("validate", "configs/tiny-cpu-tune.yaml", "tune.asha.grace_periode=4"),
}


def lorapipe_command() -> list[str]:
    """The installed console script when there is one, else the module (same entry point)."""
    script = Path(sys.executable).parent / "lorapipe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]


@pytest.fixture(scope="module")
def cli_runs() -> dict[str, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {name: subprocess.Popen(lorapipe_command() + list(args), cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in SUBPROCESS_CASES.items()}
    runs = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        runs[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return runs


def assert_one_line_error(returncode: int, stdout: str, stderr: str) -> str:
    assert returncode == 2, (returncode, stderr)
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("lorapipe: error: ")
    assert stdout == ""  # nothing half-printed
    return lines[0]


# --------------------------------------------------------------------------- the real command
def test_validate_prints_the_resolved_config_and_the_global_batch(cli_runs):
    proc = cli_runs["ok"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    *yaml_part, last = proc.stdout.rstrip("\n").splitlines()
    assert last == "# global batch size: 16 (micro_batch_size 8 x grad_accum 1 x workers 2)"
    printed = config_from_yaml_text("\n".join(yaml_part))
    assert printed == load_config(ROOT / TINY)
    # Resolved: defaults the file leaves out are written out too.
    data = yaml.safe_load("\n".join(yaml_part))
    assert data["train"]["betas"] == [0.9, 0.999]
    assert data["deepspeed"]["offload_optimizer"] == "none"


def test_validate_unknown_key_is_one_line_with_a_suggestion(cli_runs):
    proc = cli_runs["typo"]
    line = assert_one_line_error(proc.returncode, proc.stdout, proc.stderr)
    assert "did you mean 'lora.r'" in line and "'lora.rr'" in line


def test_validate_missing_config_file_exits_2(cli_runs):
    proc = cli_runs["missing"]
    line = assert_one_line_error(proc.returncode, proc.stdout, proc.stderr)
    assert "config file not found" in line and "does-not-exist.yaml" in line


def test_validate_rejects_a_misspelled_tune_key(cli_runs):
    proc = cli_runs["tune_typo"]
    line = assert_one_line_error(proc.returncode, proc.stdout, proc.stderr)
    assert "'tune.asha.grace_periode'" in line and "did you mean 'tune.asha.grace_period'" in line


@pytest.mark.parametrize("override, expected", [
    ("tune.space={lora.rank: {choice: [4, 8]}}", "tune.space key 'lora.rank' is not a config key; did you mean 'lora.r'"),
    ("tune.space={train.lr: {loguniform: [0.1, 0.01]}}", "loguniform range [0.1, 0.01] is empty or inverted"),
    ("tune.space={lora.r: {choice: [4, 0]}}", "tune.space.lora.r"),
    ("tune.metric=accuracy", "tune.metric: 'accuracy' is not produced by training"),
    ("tune.asha.grace_period=500", "tune.asha.grace_period=500 must be < train.max_steps"),
])
def test_validate_checks_the_tune_section_at_load(run_main, override, expected):
    code, out, err = run_main("validate", "configs/tiny-cpu-tune.yaml", override)
    line = assert_one_line_error(code, out, err)
    assert expected in line


# --------------------------------------------------------------------------- in-process
@pytest.fixture
def run_main(capsys, monkeypatch):
    """main(argv) in this process -> (exit status, stdout, stderr); env changes are undone."""
    from pipelines.cli import main

    for key in ("DS_ACCELERATOR", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM",
                "HF_DATASETS_DISABLE_PROGRESS_BARS", "RAY_TRAIN_V2_ENABLED", "RAY_DEDUP_LOGS"):
        if key in os.environ:  # re-set to itself: monkeypatch then restores it at teardown
            monkeypatch.setenv(key, os.environ[key])
        else:  # records "absent", so a value main() sets is removed again
            monkeypatch.delenv(key, raising=False)

    def run(*argv: str, cwd: Path = ROOT):
        monkeypatch.chdir(cwd)
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_validate_applies_overrides(run_main):
    code, out, err = run_main("validate", TINY, "train.micro_batch_size=3", "train.grad_accum=4",
                              "scaling.num_workers=5", "lora.target_modules=[q_proj, v_proj]")
    assert code == 0, err
    assert out.rstrip("\n").splitlines()[-1] == "# global batch size: 60 (micro_batch_size 3 x grad_accum 4 x workers 5)"
    data = yaml.safe_load(out)
    assert data["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert data["train"]["micro_batch_size"] == 3


@pytest.mark.parametrize("args, words", [
    ((TINY, "lora.r=0"), "lora.r=0"),
    ((TINY, "train.lr"), "KEY=VALUE"),
    ((TINY, "deepspeed.stage=3"), "model.quant_storage"),
    ((TINY, "trian.lr=0.1"), "did you mean 'train'"),
    ((TINY, "method=full"), "method=full trains every weight; a 4-bit base cannot be trained: set "
                            "model.quantization=none"),
    ((TINY, "method=lora"), "set model.quantization=none, or method=qlora"),
    (("configs/nope.yaml",), "config file not found"),
])
def test_validate_bad_input_exits_2_with_one_line(run_main, args, words):
    code, out, err = run_main("validate", *args)
    assert words in assert_one_line_error(code, out, err)


def test_validate_invalid_yaml_is_one_line(run_main, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    code, out, err = run_main("validate", str(bad))
    assert "not valid YAML" in assert_one_line_error(code, out, err)


def test_validate_works_from_another_directory(run_main, tmp_path):
    config = tmp_path / "mine.yaml"
    shutil.copy(ROOT / TINY, config)
    code, out, err = run_main("validate", "mine.yaml", "name=mine", cwd=tmp_path)
    assert code == 0, err
    assert yaml.safe_load(out)["name"] == "mine"


def test_validate_switches_to_full_finetuning_with_two_keys(run_main):
    code, out, err = run_main("validate", TINY, "method=full", "model.quantization=none")
    assert code == 0, err
    data = yaml.safe_load(out)
    assert data["method"] == "full" and data["model"]["quantization"] == "none"
