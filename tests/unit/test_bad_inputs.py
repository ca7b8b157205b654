"""The bad-input catalogue: every case is one clear line on stderr naming the problem, exit
status 2, no traceback, and nothing written (no run directory, no registry entry).

Cases run the real CLI in-process; the ones that reach `train` fail in preflight, before Ray.
"""
from __future__ import annotations

import json

import pytest

from pipelines.cli import main

TINY = "configs/tiny-cpu.yaml"


@pytest.fixture
def env(tmp_path, builtin_tiny_llama_dir):
    """Files the cases point at: good/bad data, a fake run dir, a model dir without weights."""
    good_rows = [{"instruction": "Reverse the word.", "input": "a b c", "output": "c b a"}] * 40
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good_rows))
    (tmp_path / "malformed.jsonl").write_text('{"instruction": "x", "output": "y"}\n{not json}\n')
    (tmp_path / "missing_field.jsonl").write_text(json.dumps({"instruction": "x"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}
    (tmp_path / "bad_role.jsonl").write_text(json.dumps(chat) + "\n")
    no_assistant = {"messages": [{"role": "user", "content": "a"}]}
    (tmp_path / "no_assistant.jsonl").write_text(json.dumps(no_assistant) + "\n")
    sharegpt = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    (tmp_path / "sg_role.jsonl").write_text(json.dumps({"conversations": sharegpt}) + "\n"
                                            + json.dumps({"conversations": sharegpt + [{"from": "bard", "value": "c"}]}))
    (tmp_path / "sg_empty.jsonl").write_text(json.dumps({"conversations": []}) + "\n")
    (tmp_path / "latin1.txt").write_bytes(b"a b\nna\xefve\n")
    (tmp_path / "blank.txt").write_text("\n\n")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "README").write_text("no weights here")
    (tmp_path / "partial_run").mkdir()
    (tmp_path / "partial_run" / "config.yaml").write_text("name: x\n")
    (tmp_path / "not_yaml.yaml").write_text("model: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    return {"tmp": tmp_path, "model": str(builtin_tiny_llama_dir)}


def _train(env, *overrides):
    t = env["tmp"]
    return ["train", TINY, f"run.output_dir={t / 'runs'}", f"mlflow.tracking_uri=sqlite:///{t / 'mlflow.db'}",
            f"model.path={env['model']}", "--no-progress", *overrides]


CASES = [
    # config
    ("unknown key", lambda e: ["validate", TINY, "lora.rank=8"], "did you mean 'lora.r'"),
    ("unknown section", lambda e: ["validate", TINY, "optimizer.lr=1"], "unknown key 'optimizer'"),
    ("wrong type", lambda e: ["validate", TINY, "train.max_steps=many"], "train.max_steps"),
    ("rank zero", lambda e: ["validate", TINY, "lora.r=0"], "lora.r=0"),
    ("negative lr", lambda e: ["validate", TINY, "train.lr=-1e-4"], "train.lr"),
    ("dropout one", lambda e: ["validate", TINY, "lora.dropout=1.0"], "lora.dropout"),
    ("stage four", lambda e: ["validate", TINY, "deepspeed.stage=4"], "deepspeed.stage"),
    ("zero3 4bit storage", lambda e: ["validate", TINY, "deepspeed.stage=3"], "quant_storage"),
    ("offload params stage2", lambda e: ["validate", TINY, "deepspeed.offload_params=cpu"], "needs deepspeed.stage=3"),
    ("warmup >= steps", lambda e: ["validate", TINY, "train.warmup_steps=30"], "warmup_steps"),
    ("no eval before end", lambda e: ["validate", TINY, "train.eval_every=31"], "eval_every"),
    ("prompt mask on text", lambda e: ["validate", TINY, "data.format=text", "data.train_on_prompt=true"], "train_on_prompt"),
    ("bad format", lambda e: ["validate", TINY, "data.format=csv"], "data.format"),
    ("bad target type", lambda e: ["validate", TINY, "lora.target_modules=5"], "lora.target_modules"),
    ("override without =", lambda e: ["validate", TINY, "lora.r"], "KEY=VALUE"),
    ("missing config", lambda e: ["validate", "configs/nope.yaml"], "config file not found"),
    ("config not yaml", lambda e: ["validate", str(e["tmp"] / "not_yaml.yaml")], "not valid YAML"),
    ("credentials in tracking uri", lambda e: ["validate", TINY, "mlflow.tracking_uri=http://bob:hunter2@127.0.0.1:5000"],
     "MLFLOW_TRACKING_PASSWORD"),
    ("config not mapping", lambda e: ["validate", str(e["tmp"] / "list.yaml")], "must be a mapping"),
    # model and data (train preflight, before Ray starts)
    ("missing model path", lambda e: _train(e, f"model.path={e['tmp'] / 'no_model'}"), "model path not found"),
    ("dir without model", lambda e: _train(e, f"model.path={e['tmp'] / 'not_a_model'}"), "cannot load"),
    ("absent target module", lambda e: _train(e, "lora.target_modules=[q_proj,wq]"), "not in the model"),
    ("missing dataset", lambda e: _train(e, f"data.path={e['tmp'] / 'nope.jsonl'}", "data.task=null"), "dataset file not found"),
    ("malformed jsonl", lambda e: _train(e, f"data.path={e['tmp'] / 'malformed.jsonl'}", "data.task=null"), "line 2"),
    ("missing field", lambda e: _train(e, f"data.path={e['tmp'] / 'missing_field.jsonl'}", "data.task=null"), "row 1"),
    ("empty dataset", lambda e: _train(e, f"data.path={e['tmp'] / 'empty.jsonl'}", "data.task=null"), "is empty"),
    ("csv suffix", lambda e: _train(e, f"data.path={e['tmp'] / 'data.csv'}", "data.task=null"), ".parquet"),
    ("wrong chat role", lambda e: _train(e, f"data.path={e['tmp'] / 'bad_role.jsonl'}", "data.task=null",
                                          "data.format=chat"), "'wizard'"),
    ("chat without assistant", lambda e: _train(e, f"data.path={e['tmp'] / 'no_assistant.jsonl'}", "data.task=null",
                                                 "data.format=chat"), "no assistant"),
    ("oversized sequences", lambda e: _train(e, f"data.path={e['tmp'] / 'good.jsonl'}", "data.task=null",
                                              "data.max_seq_len=8"), "usable rows after truncation"),
    ("unknown demo task", lambda e: _train(e, "data.task=juggle"), "not a demo task"),
    ("task on a file", lambda e: _train(e, f"data.path={e['tmp'] / 'good.jsonl'}"), "only applies"),
    ("batch larger than shard", lambda e: _train(e, "data.max_examples=20", "train.micro_batch_size=16"), "micro_batch_size"),
    ("sharegpt unknown role", lambda e: _train(e, f"data.path={e['tmp'] / 'sg_role.jsonl'}", "data.task=null",
                                                "data.format=sharegpt"), "row 2, turn 3: unknown role 'bard'"),
    ("sharegpt empty conversation", lambda e: _train(e, f"data.path={e['tmp'] / 'sg_empty.jsonl'}", "data.task=null",
                                                      "data.format=sharegpt"), "non-empty list field 'conversations'"),
    ("txt not utf-8", lambda e: _train(e, f"data.path={e['tmp'] / 'latin1.txt'}", "data.task=null", "data.format=text"),
     "not UTF-8: byte 6"),
    ("txt empty", lambda e: _train(e, f"data.path={e['tmp'] / 'blank.txt'}", "data.task=null", "data.format=text"),
     "is empty"),
    ("column mapping to a missing column", lambda e: _train(e, f"data.path={e['tmp'] / 'good.jsonl'}", "data.task=null",
                                                             "data.columns={output: answer}"), "no column 'answer'"),
    ("mixture weight zero", lambda e: ["validate", TINY, "data.path=null",
                                       "data.datasets=[{path: a.jsonl}, {path: b.jsonl, weight: 0}]"], "weight"),
    ("mixture with an empty source", lambda e: _train(e, "data.path=null", "data.task=null",
                                                       f"data.datasets=[{{path: {e['tmp'] / 'good.jsonl'}}}, "
                                                       f"{{path: {e['tmp'] / 'empty.jsonl'}}}]"), "is empty"),
    # registry
    ("unknown run dir", lambda e: ["register", str(e["tmp"] / "no_run")], "run directory not found"),
    ("incomplete run dir", lambda e: ["register", str(e["tmp"] / "partial_run")], "not a complete run directory"),
    ("merge unknown run", lambda e: ["merge", str(e["tmp"] / "no_run"), str(e["tmp"] / "out")], "run directory not found"),
    ("promote bad version", lambda e: ["promote", "m", "v1", "--tracking-uri", f"sqlite:///{e['tmp'] / 'r.db'}"],
     "not a version number"),
    ("promote missing version", lambda e: ["promote", "m", "7", "--tracking-uri", f"sqlite:///{e['tmp'] / 'r.db'}"],
     "has no version 7"),
    ("registry show unknown", lambda e: ["registry", "show", "nope", "--tracking-uri", f"sqlite:///{e['tmp'] / 'r.db'}"],
     "no registered model"),
    ("unreachable server", lambda e: ["promote", "m", "1", "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    ("sync unknown run", lambda e: ["sync", str(e["tmp"] / "no_run")], "run directory not found"),
    # planning
    ("unknown gpu", lambda e: ["plan", TINY, "--gpu", "tpu9"], "unknown GPU"),
    ("zero gpus", lambda e: ["plan", TINY, "--gpus", "0"], "at least 1"),
]


@pytest.mark.parametrize("argv_of,expected", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(env, capsys, argv_of, expected):
    argv = argv_of(env)
    rc = main(argv)
    out = capsys.readouterr()
    lines = [line for line in out.err.strip().splitlines() if line.strip()]
    assert rc == 2, (argv, out.err[-2000:])
    assert len(lines) == 1, lines
    assert lines[0].startswith("lorapipe: error:") and expected in lines[0], lines[0]
    assert "Traceback" not in out.err + out.out
    assert "hunter2" not in out.err + out.out  # a secret in bad input is not echoed back
    # Nothing half-written: no run directory, no registered model.
    assert not (env["tmp"] / "runs").exists() or not [p for p in (env["tmp"] / "runs").iterdir() if p.name != "_ray"]
    assert not (env["tmp"] / "out").exists()
    assert not (env["tmp"] / "mlflow.db").exists()  # no MLflow run either (nor the store it would go in)


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30
