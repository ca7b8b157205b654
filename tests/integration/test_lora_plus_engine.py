"""LoRA+ through the worker's real DeepSpeed engine (pipelines.train.worker.build_engine; one
process, gloo, world size 1), on both optimizer paths: the client AdamW, and the CPU Adam DeepSpeed
builds from its own config when optimizer states are offloaded. Every lora_B parameter must sit in
a group whose lr is ratio x the lora_A group's, before and through warmup and decay, and a step
must move B ratio times further than plain LoRA does from the same seed."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration

RATIO = 16.0
LR = 3e-3
PATHS = {"client-adamw": ["deepspeed.stage=2"],
         "offload-cpu-adam": ["deepspeed.stage=2", "deepspeed.offload_optimizer=cpu"]}


@pytest.fixture(scope="module")
def engine_for(tmp_path_factory, deepspeed_world1):
    """A function (overrides) -> a fresh engine around the tiny LoRA model, as the worker builds it."""
    from pipelines.config.load import load_config
    from pipelines.data.builtin import resolve_builtins
    from pipelines.train.worker import build_engine, build_model, seed_everything

    tmp = tmp_path_factory.mktemp("loraplus")

    def make(*overrides: str):
        cfg = resolve_builtins(load_config("configs/tiny-cpu.yaml", [
            "model.quantization=none", f"train.lr={LR}", "train.max_steps=10", f"run.output_dir={tmp / 'runs'}",
            *overrides]))
        seed_everything(cfg.seed)
        model, _ = build_model(cfg, torch.device("cpu"))
        return build_engine(cfg, model)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPIPE_HOME", str(tmp / "home"))
        for key, value in deepspeed_world1.items():
            mp.setenv(key, value)
        yield make


def train_steps(engine, n: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        ids = torch.randint(4, 60, (2, 24), generator=g)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()


def group_of_each_param(engine) -> dict[str, dict]:
    """Parameter name -> its optimizer group. ZeRO flattens each group into one tensor; it keeps
    the original parameters of group i in bit16_groups[i]."""
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    return {name_of[id(p)]: group for group, params in zip(engine.optimizer.param_groups, engine.optimizer.bit16_groups)
            for p in params}


@pytest.mark.parametrize("path", PATHS)
def test_every_B_param_keeps_ratio_times_As_lr_through_the_schedule(engine_for, path):
    from pipelines.train.worker import learning_rates

    engine = engine_for(*PATHS[path], f"lora.plus_lr_ratio={RATIO}", "train.warmup_steps=3", "train.scheduler=cosine")
    if path == "offload-cpu-adam":
        assert type(engine.basic_optimizer).__name__ == "DeepSpeedCPUAdam"
    groups = group_of_each_param(engine)
    a_groups = {id(g) for n, g in groups.items() if ".lora_A." in n}
    b_groups = {id(g) for n, g in groups.items() if ".lora_B." in n}
    assert len(a_groups) == len(b_groups) == 1 and a_groups != b_groups
    assert sum(".lora_B." in n for n in groups) == sum(".lora_A." in n for n in groups) == 2 * 7 * 2
    a_group = next(g for n, g in groups.items() if ".lora_A." in n)
    b_group = next(g for n, g in groups.items() if ".lora_B." in n)
    seen = []
    for steps in (0, 1, 1, 2, 4):  # cumulative 0, 1, 2, 4, 8: warmup, peak, cosine decay
        train_steps(engine, steps)
        assert b_group["lr"] == pytest.approx(RATIO * a_group["lr"], rel=1e-12)
        assert learning_rates(engine) == {"lr": a_group["lr"], "lr_B": b_group["lr"]}
        seen.append(a_group["lr"])
    assert seen[:3] == pytest.approx([0.0, LR / 3, 2 * LR / 3])  # linear warmup over 3 steps
    assert seen[4] < LR  # decaying after the peak


@pytest.mark.parametrize("path", PATHS)
def test_a_step_moves_B_ratio_times_further_than_plain_lora(engine_for, path):
    """PEFT starts B at zero, so A's first gradient is zero and Adam's first update of B is
    lr * g/(|g| + eps): |B| = that group's lr wherever g is not tiny."""
    def adapter_after(steps: int, *extra: str) -> dict[str, torch.Tensor]:
        engine = engine_for(*PATHS[path], "train.warmup_steps=0", "train.scheduler=constant", *extra)
        train_steps(engine, steps)
        return {n: p.detach().clone() for n, p in engine.module.named_parameters() if "lora_" in n}

    def max_abs(weights: dict, kind: str) -> float:
        return max(float(w.abs().max()) for n, w in weights.items() if kind in n)

    plain, plus = adapter_after(1), adapter_after(1, f"lora.plus_lr_ratio={RATIO}")
    assert max_abs(plain, ".lora_B.") == pytest.approx(LR, rel=1e-3)
    assert max_abs(plus, ".lora_B.") == pytest.approx(RATIO * LR, rel=1e-3)
    assert all(torch.equal(plain[n], plus[n]) for n in plain if ".lora_A." in n)  # same init, no A gradient yet

    plain, plus = adapter_after(3), adapter_after(3, f"lora.plus_lr_ratio={RATIO}")
    b_norm = {k: sum(float(w.norm() ** 2) for n, w in d.items() if ".lora_B." in n) ** 0.5
              for k, d in (("plain", plain), ("plus", plus))}
    assert b_norm["plus"] > 4 * b_norm["plain"]
    assert any(not torch.allclose(plain[n], plus[n]) for n in plain if ".lora_A." in n)


def test_plain_lora_logs_one_learning_rate(engine_for):
    from pipelines.train.worker import learning_rates

    engine = engine_for(*PATHS["client-adamw"])
    assert len(engine.optimizer.param_groups) == 1
    assert learning_rates(engine) == {"lr": engine.get_lr()[0]}
