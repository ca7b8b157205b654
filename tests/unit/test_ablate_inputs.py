"""`lorapipe ablate` without Ray: what each value sets, the refusals before anything runs, and the
table/CSV/plot it writes from rows (the run on a real Ray is tests/integration/test_ablate.py;
pytest refuses two test modules of one basename, hence this name)."""
from __future__ import annotations

import csv
import io

import pytest

from pipelines.ablate.grid import DEFAULT_VALUES, trial_configs
from pipelines.ablate.run import ablation_suite, table_set, unmet_resource
from pipelines.ablate.table import CSV_COLUMNS, csv_text, markdown_table, plot_ablation
from pipelines.cli import main
from pipelines.config.load import load_config
from pipelines.core.errors import UserError
from pipelines.tune.search import trials_that_fit

ABLATE = "configs/tiny-cpu-ablate.yaml"


@pytest.fixture
def cfg():
    return load_config(ABLATE)


def test_rank_values_keep_alpha_over_r_and_full_switches_method(cfg):
    configs = trial_configs(cfg, "rank", ["1", "16", "full"])
    ratio = cfg.lora.alpha / cfg.lora.r
    assert [c.lora.r for c in list(configs.values())[:2]] == [1, 16]
    assert [c.lora.alpha / c.lora.r for c in list(configs.values())[:2]] == [ratio, ratio]
    assert configs["full"].method == "full" and configs["full"].model.quantization == "none"
    assert all(c.method == cfg.method for v, c in configs.items() if v != "full")


def test_method_values_set_method_and_quantization_together(cfg):
    configs = trial_configs(cfg, "method")
    assert list(configs) == DEFAULT_VALUES["method"]
    assert {v: (c.method, c.model.quantization) for v, c in configs.items()} == {
        "lora": ("lora", "none"), "qlora": ("qlora", "nf4"), "full": ("full", "none")}


def test_variant_values_differ_from_plain_lora_in_one_key(cfg):
    configs = trial_configs(cfg, "variant")
    lora = configs["lora"].lora
    assert (lora.use_rslora, lora.use_dora, lora.plus_lr_ratio) == (False, False, None)
    assert configs["rslora"].lora.use_rslora and configs["dora"].lora.use_dora
    assert configs["loraplus"].lora.plus_lr_ratio == 16.0
    assert {c.lora.r for c in configs.values()} == {cfg.lora.r}


def test_target_values_are_presets_or_module_lists(cfg):
    configs = trial_configs(cfg, "targets", ["qkvo", "q_proj,v_proj"])
    assert configs["qkvo"].lora.target_modules == "qkvo"
    assert configs["q_proj,v_proj"].lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("kind, values, message", [
    ("rank", ["0"], "'0' is not a rank; give integers 1..1024 or 'full'"),
    ("rank", ["8", "8"], "values repeat"),
    ("method", ["lora", "qdora"], "'qdora' is not a method; choose from lora, qlora, full"),
    ("variant", ["vera"], "'vera' is not a variant; choose from lora, rslora, dora, loraplus"),
    ("targets", ["q k"], "neither a preset"),
    ("depth", None, "unknown ablation 'depth'; choose one of: rank, targets, method, variant"),
])
def test_bad_values_fail_in_one_line(cfg, kind, values, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trial_configs(cfg, kind, values)


def test_full_on_a_4bit_base_is_refused_and_adapter_ablations_need_an_adapter(cfg):
    with pytest.raises(UserError, match="method=full trains every weight; a 4-bit base cannot be trained"):
        load_config(ABLATE, ["method=full", "model.quantization=nf4"])
    full = load_config(ABLATE, ["method=full"])
    with pytest.raises(UserError, match="the rank ablation varies the adapter, but tiny-cpu-ablate uses method=full"):
        trial_configs(full, "rank", ["8"])
    assert set(trial_configs(full, "method")) == {"lora", "qlora", "full"}


def test_config_without_eval_suite_names_what_to_add():
    plain = load_config("configs/tiny-cpu.yaml")
    with pytest.raises(UserError, match="has no eval: section.*add eval: {suite_file:"):
        ablation_suite(plain)


def test_table_set_needs_exact_match_perplexity_and_loss(cfg):
    from pipelines.eval.suite import suite_for_config

    suite = suite_for_config(cfg)
    name = table_set(cfg, suite)
    assert {"exact_match", "perplexity", "loss"} <= set(next(s for s in suite.sets if s.name == name).metrics)
    spec = suite.sets[0]
    thin = suite.model_copy(update={"sets": [spec.model_copy(update={"metrics": ["loss"]})]})
    with pytest.raises(UserError, match="needs exact_match, perplexity and loss: add exact_match, perplexity"):
        table_set(cfg, thin)


def test_trials_that_cannot_fit_name_the_resource():
    cfg = load_config(ABLATE, ["scaling.num_workers=2", "scaling.cpus_per_worker=2"])
    assert "needs 4 CPUs (scaling.num_workers=2 x scaling.cpus_per_worker=2) but the cluster has 2" in \
        unmet_resource(cfg, {"CPU": 2.0}, [{"CPU": 2.0}])
    assert "no node has that many" in unmet_resource(cfg, {"CPU": 8.0}, [{"CPU": 1.0}] * 8)
    gpu = load_config(ABLATE, ["scaling.use_gpu=true", "scaling.num_workers=2"])
    assert "needs 2 GPUs" in unmet_resource(gpu, {"CPU": 16.0, "GPU": 1.0}, [{"CPU": 16.0, "GPU": 1.0}])
    assert unmet_resource(cfg, {"CPU": 8.0}, [{"CPU": 4.0}, {"CPU": 4.0}]) is None
    assert trials_that_fit(cfg, {"CPU": 8.0}) == 2


def test_cli_refuses_unknown_kind_and_bad_value_with_exit_2(capsys):
    assert main(["ablate", "depth", ABLATE]) == 2
    assert "unknown ablation 'depth'" in capsys.readouterr().err
    assert main(["ablate", "rank", ABLATE, "--values", "4", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'0' is not a rank" in err[0]


ROWS = [
    {"value": "1", "status": "completed", "trainable_params": 1000, "trainable_pct": 0.1, "accuracy": 0.25,
     "perplexity": 3.5, "eval_loss": 1.25, "peak_memory_bytes": 2**30, "train_seconds": 40.0},
    {"value": "64", "status": "completed", "trainable_params": 64000, "trainable_pct": 6.4, "accuracy": 0.75,
     "perplexity": 1.5, "eval_loss": 0.4, "peak_memory_bytes": 2**30, "train_seconds": 50.0},
    {"value": "full", "status": "completed", "trainable_params": 1_000_000, "trainable_pct": 100.0,
     "accuracy": 0.8, "perplexity": 1.4, "eval_loss": 0.3, "peak_memory_bytes": 2**31, "train_seconds": 70.0},
    {"value": "4", "status": "error", "error": "boom"},
]


def test_csv_has_the_named_columns_and_a_line_per_value():
    rows = list(csv.DictReader(io.StringIO(csv_text(ROWS))))
    assert tuple(rows[0]) == CSV_COLUMNS == ("value", "trainable_params", "trainable_pct", "accuracy", "perplexity",
                                             "eval_loss", "peak_memory_bytes", "train_seconds")
    assert [r["value"] for r in rows] == ["1", "64", "full", "4"]
    assert float(rows[1]["accuracy"]) == 0.75 and rows[3]["accuracy"] == ""


def test_markdown_leads_with_each_classic_tables_columns():
    rank = markdown_table("rank", ROWS).splitlines()
    assert rank[0].startswith("| Rank | Trainable % | Accuracy | Perplexity |")
    assert rank[2].startswith("| 1 | 0.10% | 25.0% | 3.500 |")
    assert rank[4].startswith("| full fine-tuning | 100.00% | 80.0% |")
    assert rank[5].startswith("| 4 | error |")
    assert markdown_table("method", ROWS).startswith("| Method | Peak Memory | Accuracy | Training Time |")
    targets = [dict(r, value="qkv", modules=["k_proj", "q_proj", "v_proj"]) for r in ROWS[:1]]
    table = markdown_table("targets", targets)
    assert table.startswith("| Target Modules | Trainable Params | Accuracy |")
    assert "| qkv (k_proj, q_proj, v_proj) | 1,000 | 25.0% |" in table


def test_plot_is_a_png(tmp_path):
    out = plot_ablation("rank", ROWS, tmp_path / "plot.png", "rank ablation")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
