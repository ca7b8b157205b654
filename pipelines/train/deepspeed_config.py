"""The DeepSpeed config dict, derived from the run config in one place."""
from __future__ import annotations


def build_deepspeed_config(cfg) -> dict:
    ds, tr = cfg.deepspeed, cfg.train
    zero: dict = {"stage": ds.stage, "overlap_comm": ds.overlap_comm}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": cfg.scaling.use_gpu}
    if ds.offload_params != "none":
        zero["offload_param"] = {"device": ds.offload_params, "pin_memory": cfg.scaling.use_gpu}
    if ds.stage == 3:
        # Adapters are gathered explicitly on save; never gather the (frozen, huge) base.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "gradient_clipping": tr.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "fp16": {"enabled": cfg.model.dtype == "fp16"},
        "steps_per_print": 10**9,  # progress is ours; silence DeepSpeed's
        "wall_clock_breakdown": False,
        # A torch AdamW over the adapter is the client optimizer unless states are offloaded.
        "zero_allow_untested_optimizer": True,
    }
    if ds.offload_optimizer != "none":
        # Offloaded states want DeepSpeed's CPU Adam, which only it can build from its own config.
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": tr.lr, "betas": list(tr.betas), "weight_decay": tr.weight_decay, "eps": 1e-8}}
    return config
