"""The eval stage end to end on real runs, real MLflow (sqlite) and real Ray: the promotion gate on
common ground (the trap), the cache, suites never mixed, lm-eval-harness tasks, adapter-vs-merged
parity at registration, and `generate`.

Run directories are trained in this process (a few real LoRA steps, evalkit.py), once per module:
later stages read only the run directory.
"""
from __future__ import annotations

import io
import json
import os

import pytest
import torch
from evalkit import train_task_run

pytestmark = pytest.mark.integration

SUITE = {"sets": [{"name": "reverse", "path": "builtin:demo-tasks", "task": "reverse", "limit": 48, "max_seq_len": 96,
                   "metrics": ["loss", "perplexity"]}],
         "primary": {"metric": "reverse/loss", "mode": "min"}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Private asset/cache folders, one thread (a busy 2-core box slows spinning OpenMP threads
    by orders of magnitude), a sqlite MLflow store, and the runs every test reuses."""
    root = tmp_path_factory.mktemp("eval")
    saved = {k: os.environ.get(k) for k in ("LORAPIPE_HOME", "LORAPIPE_CACHE")}
    os.environ.update(LORAPIPE_HOME=str(root / "home"), LORAPIPE_CACHE=str(root / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    runs = {task: train_task_run(root, task, task=task, steps=20, uri=uri) for task in ("reverse", "first")}
    yield {"root": root, "uri": uri, **runs}
    torch.set_num_threads(threads)
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def suite_obj(data=None):
    from pipelines.config.eval_suite import EvalSuite

    return EvalSuite.model_validate(data or SUITE)


def test_the_trap_gate_judges_on_the_shared_suite(env, capsys):
    """`first` has the lower eval loss on its own (easier) split, but is worse on reverse rows:
    the gate refuses it over a `reverse` champion, shows both rows, and the opposite case promotes."""
    import mlflow

    from pipelines.cli import main
    from pipelines.registry.promote import promote, rollback
    from pipelines.registry.register import register_run

    uri, rev, first = env["uri"], env["reverse"], env["first"]
    assert first.metrics()["eval_loss"] < rev.metrics()["eval_loss"] - 0.3  # own splits: the trap is set

    champ = register_run(rev.path, name="trap", tracking_uri=uri, suite=suite_obj())
    assert promote("trap-merged", champ.merged_version, "champion", tracking_uri=uri).promoted
    cand = register_run(first.path, name="trap", tracking_uri=uri)  # judged on the model's gate suite
    assert main(["promote", "trap-merged", cand.merged_version, "--tracking-uri", uri]) == 1
    out = capsys.readouterr()
    assert "refused" in out.err and "reverse/loss" in out.err
    assert "candidate" in out.out and "holder" in out.out  # both rows, side by side
    c = mlflow.MlflowClient(uri)
    assert str(c.get_model_version_by_alias("trap-merged", "champion").version) == champ.merged_version
    refused = promote("trap-merged", cand.merged_version, "champion", tracking_uri=uri)
    cand_loss, hold_loss = (r["reverse/loss"] for r in refused.rows)
    assert cand_loss > hold_loss  # worse on the shared suite, though better on its own split

    # The opposite case: `first` holds the alias, `reverse` beats it on the same suite.
    first_reg = register_run(first.path, name="trap2", tracking_uri=uri, suite=suite_obj())
    assert promote("trap2-merged", first_reg.merged_version, "champion", tracking_uri=uri).promoted
    rev_reg = register_run(rev.path, name="trap2", tracking_uri=uri)
    won = promote("trap2-merged", rev_reg.merged_version, "champion", tracking_uri=uri)
    assert won.promoted and "gate passed" in won.message

    # Rollback: explicit, audited, only to a version that held the alias.
    msg = rollback("trap2-merged", "champion", first_reg.merged_version, "canary regressed", tracking_uri=uri)
    assert "rolled back" in msg
    mv = c.get_model_version("trap2-merged", first_reg.merged_version)
    assert mv.tags["lorapipe.rollback.champion.reason"] == "canary regressed"
    assert mv.tags["lorapipe.rollback.champion.from_version"] == rev_reg.merged_version
    assert main(["rollback", "trap-merged", "--to", cand.merged_version, "--reason", "x", "--tracking-uri", uri]) == 2
    assert "never held champion" in capsys.readouterr().err

    # Parity was measured at registration and recorded on both versions.
    for name, version in (("trap-adapter", champ.adapter_version), ("trap-merged", champ.merged_version)):
        tags = c.get_model_version(name, version).tags
        assert tags["lorapipe.parity_ok"] == "true"
        assert max(json.loads(tags["lorapipe.parity"]).values()) < 1e-3


def test_eval_computes_once_and_never_mixes_suites(env, ray_local, monkeypatch, capsys, tmp_path):
    """Same (target, suite) twice: computed once (counted). Another suite: another fingerprint and
    result. A gate suite whose data changed is refused, not compared. The Ray path is used (Ray is up)."""
    import mlflow

    import pipelines.eval.run as run_mod
    from pipelines.cli import main
    from pipelines.registry.register import register_run

    calls = []
    real = run_mod.compute_metrics
    monkeypatch.setattr(run_mod, "compute_metrics", lambda *a: calls.append(a[0].digest) or real(*a))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in __import__("pipelines.data.builtin", fromlist=["x"])
                            .demo_rows("reverse", n=24, seed=7)))
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(json.dumps({"sets": [{"name": "f", "path": str(rows), "metrics": ["loss", "exact_match"],
                                                "generation": {"max_new_tokens": 6}}],
                                      "primary": {"metric": "f/loss", "mode": "min"}}))
    run = env["reverse"]
    outs = []
    for _ in range(2):
        assert main(["eval", str(run.path), "--suite", str(suite_file), "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    # Ray is up in this process, so the computation ran as a Ray task (the counter wraps the
    # function shipped to it; it counts on the driver only when Ray is down): count cache misses.
    assert [o["cached"] for o in outs] == [False, True]
    assert outs[0]["metrics"] == outs[1]["metrics"] and outs[0]["suite_fingerprint"] == outs[1]["suite_fingerprint"]
    assert outs[0]["target_digest"] == run.digest_of("adapter/adapter_model.safetensors")
    assert (run.path / "eval" / f"{outs[0]['suite_fingerprint']}.json").is_file()
    assert set(outs[0]["metrics"]) == {"f/loss", "f/exact_match"}

    # Without Ray: in-process, and the counter sees each computation.
    import ray

    ray.shutdown()
    from pipelines.eval.run import evaluate

    fresh = {**SUITE, "sets": [{**SUITE["sets"][0], "limit": 40}]}  # a suite not evaluated before
    before = len(list((run.path / "eval").glob("*.json")))
    other = evaluate(str(run.path), suite_obj(fresh))
    again = evaluate(str(run.path), suite_obj(fresh))
    assert calls == [run.digest_of("adapter/adapter_model.safetensors")]  # computed once
    assert other.fingerprint != outs[0]["suite_fingerprint"] and not again.computed
    assert len(list((run.path / "eval").glob("*.json"))) == before + 1

    # The registered version carries the result as MLflow 3 model metrics (LoggedModel + dataset).
    uri = env["uri"]
    reg = register_run(run.path, name="cache", tracking_uri=uri, suite=suite_obj({
        "sets": [{"name": "f", "path": str(rows), "metrics": ["loss"]}], "primary": {"metric": "f/loss", "mode": "min"}}))
    c = mlflow.MlflowClient(uri)
    model_id = c.get_model_version("cache-merged", reg.merged_version).tags["lorapipe.model_id"]
    logged = {m.key: m for m in c.get_logged_model(model_id).metrics}
    assert "f/loss" in logged and logged["f/loss"].dataset_name == "f"
    # The gate suite's data changes: its results are not comparable, so promote refuses.
    register_run(env["first"].path, name="cache", tracking_uri=uri)
    assert main(["promote", "cache-merged", reg.merged_version, "--alias", "champion", "--tracking-uri", uri]) == 0
    rows.write_text(rows.read_text().replace('"output": "', '"output": "x '))
    assert main(["promote", "cache-merged", str(int(reg.merged_version) + 1), "--tracking-uri", uri]) == 2
    assert "never compared" in capsys.readouterr().err


def test_lm_eval_harness_task_sees_the_adapter(env, tmp_path):
    """A local lm-eval task (YAML + JSONL written here) on the base alone and base + adapter."""
    from pipelines.data.builtin import demo_rows
    from pipelines.data.prompts import alpaca_prompt
    from pipelines.eval.run import evaluate

    data = tmp_path / "rev.jsonl"
    data.write_text("".join(json.dumps({"q": alpaca_prompt(r["instruction"], r["input"]), "a": r["output"]}) + "\n"
                            for r in demo_rows("reverse", n=16, seed=3)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "rev_ll.yaml").write_text(
        f"task: rev_ll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "metadata:\n  version: 1.0\n")
    suite = suite_obj({**SUITE, "harness": {"include_path": str(tmp_path / "tasks"), "tasks": ["rev_ll"], "batch_size": 4},
                       "primary": {"metric": "harness/rev_ll/perplexity", "mode": "min"}})
    run = env["reverse"]
    base = evaluate(f"base:{run.path}", suite)
    tuned = evaluate(str(run.path), suite)
    key = "harness/rev_ll/perplexity"
    assert key in base.metrics and key in tuned.metrics
    assert tuned.metrics[key] < base.metrics[key]  # the adapter learnt reverse: its answers got likelier


def test_a_corrupted_merged_model_is_not_registered(env, tmp_path, capsys):
    import mlflow
    from safetensors.torch import load_file, save_file

    from pipelines.cli import main
    from pipelines.registry.merge import merge_run

    run, uri = env["reverse"], env["uri"]
    merged = tmp_path / "merged"
    merge_run(run.path, merged)
    weights = load_file(str(merged / "model.safetensors"))
    key = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    weights[key] = weights[key].flip(0).contiguous()  # a merge gone wrong: output rows scrambled
    save_file(weights, str(merged / "model.safetensors"), metadata={"format": "pt"})
    argv = ["register", str(run.path), "--name", "corrupt", "--merged", str(merged), "--tracking-uri", uri]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "merged model differs from its adapter" in err[0] and "not registered" in err[0]
    c = mlflow.MlflowClient(uri)
    assert c.search_model_versions("name='corrupt-merged'") == []
    adapter = c.search_model_versions("name='corrupt-adapter'")
    assert len(adapter) == 1 and adapter[0].tags["lorapipe.parity_ok"] == "false"


def test_generate_streams_the_trained_answer(env, capsys, monkeypatch):
    """A run that learnt one demo row answers its prompt with the trained answer, one-shot and
    in the stdin loop."""
    from pipelines.cli import main
    from pipelines.data.builtin import demo_rows

    row = demo_rows("copy", n=1, seed=0)[0]
    memo = train_task_run(env["root"], "memo", task="copy", steps=100, uri=env["uri"], max_examples=1,
                          quantization="none", lr=1e-2, repeat=24)
    assert main(["generate", str(memo.path), "--prompt", row["instruction"], "--input", row["input"]]) == 0
    assert capsys.readouterr().out.strip() == row["output"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{row['instruction']}\n\n{row['instruction']}\n"))
    assert main(["generate", str(memo.path), "--input", row["input"], "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.split() == (row["output"].split() * 2)
    assert main(["generate", str(memo.path), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_tune_ranks_trials_by_a_suite_metric_and_pipeline_reuses_the_best_run(env):
    """tune.rank_by=suite:<metric> ranks finished trials' run dirs on the suite (here: the trial
    with the lower own eval loss loses on the suite), and the best trial that ran to max_steps
    is registered as is (SearchResult.finished_best_run) instead of being trained again."""
    from pipelines.config.load import load_config
    from pipelines.tune.search import SearchResult, rank_by_suite

    cfg = load_config("configs/tiny-cpu-tune.yaml", ["eval.suite=" + json.dumps(SUITE), "tune.rank_by=suite:reverse/loss"])
    rows = [{"trial_id": t, "run_dir": str(env[t].path), "status": "completed", "eval_loss": env[t].metrics()["eval_loss"]}
            for t in ("first", "reverse")]
    key, mode = rank_by_suite(cfg, rows, cfg.tune.rank_by)
    assert (key, mode) == ("suite:reverse/loss", "min")
    best = min(rows, key=lambda r: r[key])
    assert best["trial_id"] == "reverse" and min(rows, key=lambda r: r["eval_loss"])["trial_id"] == "first"
    result = SearchResult("x", "x", rows, best, "x", None, cfg)
    assert result.finished_best_run().path == env["reverse"].path
    result.best = {**best, "status": "stopped early"}
    assert result.finished_best_run() is None
