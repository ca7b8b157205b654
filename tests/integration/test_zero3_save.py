"""The ZeRO-3 adapter save, through the real path: a DeepSpeed ZeRO-3 engine around the tiny LoRA
model (one process, gloo, world size 1) and checkpoint.write_adapter, which saves with PEFT and
verifies the files. ZeRO-3 partitions every parameter even at world size 1: the shard goes to
`param.ds_tensor` and `param.data` becomes a 0-element placeholder, so a save that does not gather
first writes empty tensors. The guard must turn that into an error, not a file."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def zero3_engine(tmp_path_factory, deepspeed_world1):
    """A fresh ZeRO-3 engine (no forward yet: every LoRA matrix is partitioned), its run config and
    layer shapes, in the session's single-process group."""
    from pipelines.config.load import load_config
    from pipelines.data.builtin import resolve_builtins
    from pipelines.train.worker import build_engine, build_model

    tmp = tmp_path_factory.mktemp("zero3")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPIPE_HOME", str(tmp / "home"))
        for key, value in deepspeed_world1.items():
            mp.setenv(key, value)
        cfg = resolve_builtins(load_config("configs/tiny-cpu.yaml", [
            "deepspeed.stage=3", "model.quant_storage=fp32", f"run.output_dir={tmp / 'runs'}"]))
        model, shapes = build_model(cfg, torch.device("cpu"))
        yield build_engine(cfg, model), cfg, shapes


def _lora_params(engine) -> dict:
    """PEFT state-dict key -> the live (partitioned) parameter."""
    return {name.replace(".default", ""): p for name, p in engine.module.named_parameters() if "lora_" in name}


def test_ungathered_zero3_adapter_is_an_error_and_leaves_no_folder(zero3_engine, tmp_path):
    from peft import get_peft_model_state_dict

    from pipelines.train.checkpoint import write_adapter

    engine, cfg, shapes = zero3_engine
    params = _lora_params(engine)
    assert params and all(p.data.numel() == 0 and p.ds_tensor.numel() > 0 for p in params.values())
    ungathered = get_peft_model_state_dict(engine.module)
    out = tmp_path / "adapter"
    with pytest.raises(RuntimeError, match=r"adapter tensor \S+lora_[AB]\.weight is empty"):
        write_adapter(engine.module, ungathered, out, cfg.lora.r, shapes)
    assert not out.exists()


def test_gathered_zero3_adapter_holds_the_partitioned_values(zero3_engine, tmp_path):
    from safetensors.torch import load_file

    from pipelines.train.checkpoint import gathered_adapter_state, write_adapter

    engine, cfg, shapes = zero3_engine
    out = write_adapter(engine.module, gathered_adapter_state(engine, 3), tmp_path / "adapter", cfg.lora.r, shapes)
    saved = load_file(str(out / "adapter_model.safetensors"))
    params = _lora_params(engine)
    assert set(saved) == set(params) and len(saved) == 2 * len(shapes)
    r = cfg.lora.r
    for key, tensor in saved.items():
        layer = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        out_f, in_f = shapes[layer]
        assert tuple(tensor.shape) == ((r, in_f) if ".lora_A." in key else (out_f, r)), key
        # At world size 1 the rank's shard is the whole (flattened, maybe padded) matrix.
        shard = params[key].ds_tensor[: tensor.numel()].view_as(tensor)
        assert torch.equal(tensor, shard), key
    # PEFT initialises A at random and B at zero: a real adapter, not a placeholder.
    assert all(t.norm() > 0 for k, t in saved.items() if ".lora_A." in k)
