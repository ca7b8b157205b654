"""The ablation's builtins (issue 19): the 'adapter' task mix and builtin:tiny-llama-pretrained."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipelines.core.errors import UserError
from pipelines.data.builtin import ADAPTER_TASKS, demo_rows

ROOT = Path(__file__).resolve().parents[2]


def expected_answer(task: str, word: str) -> str:
    """The answer written out independently of builtin.TASKS."""
    letters = {"last": word[-1], "reverse": word[::-1], "sort": "".join(sorted(word))}[task]
    return " ".join(letters)


@pytest.mark.parametrize("seed", [0, 12345])
def test_adapter_mix_cycles_its_tasks_with_exact_answers(seed):
    rows = demo_rows("adapter", n=90, seed=seed)
    assert [r["task"] for r in rows] == [ADAPTER_TASKS[i % 3] for i in range(90)]
    for row in rows:
        word = row["input"].replace(" ", "")
        assert len(word) == 3 and row["output"] == expected_answer(row["task"], word)


def test_adapter_mix_is_deterministic_and_eval_rows_differ():
    assert demo_rows("adapter", n=50, seed=0) == demo_rows("adapter", n=50, seed=0)
    train_inputs = [r["input"] for r in demo_rows("adapter", n=50, seed=0)]
    eval_inputs = [r["input"] for r in demo_rows("adapter", n=50, seed=12345)]  # configs/eval/ablate.yaml's seed
    assert train_inputs != eval_inputs


def test_existing_demo_rows_are_unchanged():
    # sha256 of json.dumps(demo_rows(task, n=60, seed=0)) before the 'adapter' mix was added
    before = {None: "fb988f5598ba775c", "generic": "0834d6ea6a5a7609", "reverse": "4b46356ce0199557"}
    for task, digest in before.items():
        assert hashlib.sha256(json.dumps(demo_rows(task, n=60, seed=0)).encode()).hexdigest()[:16] == digest


def test_unknown_task_names_the_mixes():
    with pytest.raises(UserError, match="generic, adapter, copy"):
        demo_rows("adaptor")


def test_pretrained_builtin_is_deterministic_and_trained(tmp_path, builtin_tiny_llama_dir):
    from safetensors.torch import load_file

    from pipelines.data.builtin import materialize_tiny_llama_pretrained

    a = materialize_tiny_llama_pretrained(root=tmp_path / "a", steps=3)
    b = materialize_tiny_llama_pretrained(root=tmp_path / "b", steps=3)
    assert a.name == "tiny-llama-pretrained-seed0-steps3"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    init = load_file(builtin_tiny_llama_dir / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert not (wa["model.embed_tokens.weight"] == init["model.embed_tokens.weight"]).all()
    assert (a / "tokenizer.json").read_text() == (builtin_tiny_llama_dir / "tokenizer.json").read_text()


def test_ablate_preset_validates_and_plans_the_builtin_shape():
    from pipelines.config.load import load_config
    from pipelines.eval.suite import load_suite
    from pipelines.plan.verdict import resolve_arch

    cfg = load_config(ROOT / "configs/tiny-cpu-ablate.yaml")
    assert cfg.model.path == "builtin:tiny-llama-pretrained" and cfg.data.task == "adapter"
    tiny = load_config(ROOT / "configs/tiny-cpu.yaml")
    assert resolve_arch(cfg) == resolve_arch(tiny)
    suite = load_suite(ROOT / cfg.eval.suite_file)
    assert suite.primary.metric == "adapter/exact_match" and suite.primary.mode == "max"
