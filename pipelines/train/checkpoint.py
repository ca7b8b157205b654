"""The checkpoint format, in one place: what a checkpoint holds, how each rank writes its part,
how a complete one is recognised and found, and how a worker restores from it.

<checkpoint>/adapter/                 rank 0: the gathered adapter (stock PEFT format, verified)
<checkpoint>/model/                   rank 0, method=full instead of adapter/: the gathered whole model
                                      (stock transformers safetensors + config + tokenizer, verified)
<checkpoint>/config.yaml              rank 0: the resolved config of the run
<checkpoint>/trainer_state.json       rank 0: TrainerState (step, data position, tokens, history)
<checkpoint>/rng_rank<N>.json         every rank: Python, NumPy, torch CPU (and CUDA) RNG states
<checkpoint>/deepspeed/state/         every rank: its DeepSpeed shard (optimizer, LR scheduler)
<checkpoint>/COMPLETE                 rank 0, written last: a checkpoint without it is never used
"""
from __future__ import annotations

import json
import os
import random
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
DS_DIR, DS_TAG = "deepspeed", "state"


@dataclass
class TrainerState:
    """Where the loop stands; saved in every checkpoint so a restart continues exactly."""

    step: int = 0                  # optimizer steps done
    position: int = 0              # micro batches consumed (data position)
    tokens: int = 0                # non-pad tokens trained on, all workers
    slots: int = 0                 # token slots of those batches (tokens + padding), all workers
    epoch: int = 0                 # streamed data (Ray Data): epoch of the stream
    epoch_position: int = 0        # streamed data: micro batches each worker consumed in that epoch
    train_seconds: float = 0.0     # time inside forward/backward/step, all windows
    history: list = field(default_factory=list)
    restarts: int = 0
    resumed_from_step: list = field(default_factory=list)  # one entry per restart


# -- writing ---------------------------------------------------------------------------------
def gathered_adapter_state(engine, stage: int) -> dict:
    """The full adapter state dict (on every rank). Under ZeRO-3 each rank holds a slice of every
    LoRA matrix; saving without gathering writes empty tensors."""
    import deepspeed
    from peft import get_peft_model_state_dict

    model = engine.module
    if stage < 3:
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def write_adapter(model, state_dict: dict, out: Path, lora_r: int, shapes: dict) -> Path:
    """Save the adapter and check what landed on disk: every tensor non-empty and of the shape the
    targeted layers imply. An adapter failing that is an error, never a file someone could load."""
    import shutil

    from lora import verify_adapter_files
    from lora.adapter import expected_adapter_shapes

    model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
    try:
        verify_adapter_files(out, expected_adapter_shapes({"r": lora_r}, shapes))
    except RuntimeError:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def gathered_model_state(engine, stage: int, rank: int) -> Optional[dict]:
    """Full fine-tuning: the whole model's state dict on rank 0 (None elsewhere). Under ZeRO-3
    DeepSpeed gathers it one module at a time onto rank 0 (a collective: every rank calls it), so
    no rank ever holds the whole model twice."""
    if stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return None
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def write_full_model(model, state_dict: dict, out: Path, shapes: dict, tokenizer_source) -> Path:
    """Save the whole model (safetensors + config) and the tokenizer it was trained with, and check
    what landed on disk: every tensor non-empty, named and shaped as in the model."""
    import shutil

    from lora import verify_model_files

    # One model.safetensors whatever the size: the run directory names that file (its digest is the
    # model's identity in the registry and the eval caches).
    model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True, max_shard_size="100000GB")
    try:
        verify_model_files(out, shapes)
        tokenizer_source().save_pretrained(str(out))
    except Exception:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def save_checkpoint(engine, cfg, state: TrainerState, shapes: dict, rank: int, out: Path) -> None:
    """One rank's part of a checkpoint; rank 0 writes the marker last."""
    from pipelines.config.load import dump_config

    engine.save_checkpoint(str(out / DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)
    # Gathering is a collective: every rank takes part.
    weights = (gathered_model_state(engine, cfg.deepspeed.stage, rank) if cfg.is_full
               else gathered_adapter_state(engine, cfg.deepspeed.stage))
    (out / f"rng_rank{rank}.json").write_text(json.dumps(rng_state()))
    if rank == 0:
        if cfg.is_full:
            write_full_model(engine.module, weights, out / MODEL_DIR, shapes, lambda: tokenizer_of(cfg))
        else:
            write_adapter(engine.module, weights, out / ADAPTER_DIR, cfg.lora.r, shapes)
        (out / CONFIG_FILE).write_text(dump_config(cfg))
        (out / STATE_FILE).write_text(json.dumps(asdict(state)))
        fault_point_kill_before_marker(state)
        (out / MARKER).write_text(str(state.step))


def tokenizer_of(cfg):
    from lora import load_tokenizer

    return load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, cfg.model.revision)


def weights_dir(ckpt: Path) -> tuple[Path, str]:
    """(the checkpoint's weights folder, its kind): model/ "full" or adapter/ "adapter"."""
    full = Path(ckpt) / MODEL_DIR
    return (full, "full") if full.is_dir() else (Path(ckpt) / ADAPTER_DIR, "adapter")


def fault_point_kill_before_marker(state: TrainerState) -> None:
    """Fault injection for the reliability tests: LORAPIPE_FAULT_KILL_IN_CHECKPOINT=<step> SIGKILLs
    rank 0 in the middle of that step's checkpoint (everything written but the marker), once."""
    at = os.environ.get("LORAPIPE_FAULT_KILL_IN_CHECKPOINT")
    if at and int(at) == state.step and state.restarts == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    """Every generator a step draws from: dropout and data order must continue, not repeat."""
    py = random.getstate()
    npy = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [npy[0], npy[1].tolist(), npy[2], npy[3], npy[4]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()  # this worker's device
    return state


def set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(s["cuda"], dtype=torch.uint8))


# -- reading ---------------------------------------------------------------------------------
def is_complete(ckpt: Path) -> bool:
    return (Path(ckpt) / MARKER).is_file()


def latest_complete_checkpoint(ray_run_path: Path) -> Optional[Path]:
    """The newest checkpoint_* directory under a Ray Train run that carries the marker."""
    found = sorted(p for p in Path(ray_run_path).glob("checkpoint_*") if is_complete(p))
    return found[-1] if found else None


def find_checkpoint(path: Path) -> Optional[Path]:
    """`path` itself when it is a complete checkpoint, else the newest complete one under it."""
    path = Path(path)
    return path if is_complete(path) and (path / STATE_FILE).is_file() else latest_complete_checkpoint(path)


def read_config_yaml(ckpt: Path) -> str:
    return (Path(ckpt) / CONFIG_FILE).read_text()


def read_state(ckpt: Path) -> dict:
    if not is_complete(ckpt):
        raise RuntimeError(f"checkpoint {ckpt} has no {MARKER} marker; not using it")
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def restore(engine, rank: int) -> TrainerState:
    """Continue from Ray's latest checkpoint if this is a restart (worker/node loss, resume)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return TrainerState()
    with ckpt.as_directory() as d:
        d = Path(d)
        if not is_complete(d):
            raise RuntimeError(f"checkpoint {d} has no {MARKER} marker: refusing a partial checkpoint")
        engine.load_checkpoint(str(d / DS_DIR), tag=DS_TAG, load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
        state = TrainerState(**read_state(d))
        rng_file = d / f"rng_rank{rank}.json"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
    state.restarts += 1
    state.resumed_from_step.append(state.step)
    return state
