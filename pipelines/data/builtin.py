"""Embedded assets so the pipeline runs with no hub and no files: a demo instruction set generated
by code, and a tiny Llama (built from config) with a word-level tokenizer trained on that set.

`builtin:tiny-llama` (random init), `builtin:tiny-llama-pretrained` (the same model after a brief
full-parameter pretraining on the generic tasks) and `builtin:demo-tasks` in a config are
materialised once under $LORAPIPE_HOME (default ./.lorapipe) by the driver, before any worker starts.
"""
from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path
from typing import Callable, Optional

from pipelines.core.errors import UserError
from pipelines.core.files import write_dir_atomic

TINY_LLAMA = "builtin:tiny-llama"
TINY_LLAMA_PRETRAINED = "builtin:tiny-llama-pretrained"
BUILTIN_MODELS = (TINY_LLAMA, TINY_LLAMA_PRETRAINED)
# Steps of the pretrained builtin: enough for the format and the generic tasks (train loss ~0.02),
# ~30 s on one core, once per $LORAPIPE_HOME. LoRA on the random-init base barely learns (its
# frozen embeddings and lm_head are noise); on this one, accuracy rises with the rank
# (bench/results/ablate_task.json).
PRETRAIN_STEPS = 200
DEMO_TASKS = "builtin:demo-tasks"
TINY_SHAPE = dict(hidden=128, layers=4, heads=4, intermediate=512, max_positions=256)

# task name -> (instruction, function of the word). All answers are exact strings.
TASKS: dict[str, tuple[str, Callable[[str], str]]] = {
    "copy": ("Repeat the word.", lambda w: w),
    "first": ("Give the first letter.", lambda w: w[0]),
    "middle": ("Give the middle letter.", lambda w: w[len(w) // 2]),
    "last": ("Give the last letter.", lambda w: w[-1]),
    "upper": ("Write the word in capitals.", lambda w: w.upper()),
    "reverse": ("Reverse the word.", lambda w: w[::-1]),
    "sort": ("Sort the letters.", lambda w: "".join(sorted(w))),
}
# The adapter learns a held-out task; the base is pretrained on the generic ones.
ADAPTER_TASKS = ("last", "reverse", "sort")
GENERIC_TASKS = tuple(t for t in TASKS if t not in ADAPTER_TASKS)
# Mixes a config can name as data.task (or an eval set's task): rows cycle through their tasks.
# 'adapter' (last + reverse + sort at once, on the pretrained base) is the ablation task: its
# exact match rises with LoRA rank where 'reverse' alone saturates by r=8.
MIXES = {"generic": GENERIC_TASKS, "adapter": ADAPTER_TASKS}


def home() -> Path:
    return Path(os.environ.get("LORAPIPE_HOME", ".lorapipe")).resolve()


# A small alphabet, short words and letters written apart (one token each) keep the tasks
# learnable by a ~1M-parameter model on a CPU in minutes: every answer token is a lookup at a
# fixed offset from the response.
ALPHABET = "abcdefgh"
WORD_LEN = 3


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(ALPHABET) for _ in range(WORD_LEN)) for _ in range(n)]


def spaced(word: str) -> str:
    return " ".join(word)


def demo_rows(task: Optional[str] = None, n: int = 2000, seed: int = 0) -> list[dict]:
    """Alpaca rows. task: one of TASKS, a mix of MIXES ('generic': all but the adapter tasks;
    'adapter': the adapter tasks) or None (all)."""
    if task is None:
        names = list(TASKS)
    elif task in MIXES:
        names = list(MIXES[task])
    elif task in TASKS:
        names = [task]
    else:
        raise UserError(f"data.task={task!r} is not a demo task; choose one of: {', '.join([*MIXES, *TASKS])}")
    rng = random.Random(f"{seed}-{task}")
    rows = []
    for i, word in enumerate(_words(rng, n)):
        name = names[i % len(names)]
        instruction, fn = TASKS[name]
        rows.append({"instruction": instruction, "input": spaced(word), "output": spaced(fn(word)), "task": name})
    return rows


def tokenizer_corpus() -> list[str]:
    """Every token the demo data and the alpaca/chat templates can contain."""
    from pipelines.data.prompts import ALPACA_TEMPLATE

    texts = [" ".join(string.ascii_letters + string.digits + string.punctuation)]
    texts += [instr for instr, _ in TASKS.values()]
    texts.append(ALPACA_TEMPLATE.format(instruction="", input="") + "<|system|><|user|><|assistant|>")
    return texts


def materialize_tiny_llama(root: Optional[Path] = None, seed: int = 0) -> Path:
    """A random-init tiny Llama + word-level tokenizer saved in HF format (safetensors)."""
    from lora.tiny import build_tiny_llama, train_word_tokenizer

    def build(out: Path) -> None:
        tok = train_word_tokenizer(tokenizer_corpus())
        model = build_tiny_llama(len(tok), seed=seed, pad_token_id=tok.pad_token_id,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **TINY_SHAPE)
        model.save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))

    return write_dir_atomic((root or home()) / f"tiny-llama-seed{seed}", build, exist_ok=True)


def pretrain_tiny_llama(out: Path, steps: int, seed: int = 0,
                        progress: Optional[Callable[[int, float], None]] = None) -> Path:
    """Full-parameter pretraining of the builtin tiny Llama on the generic tasks (one process),
    saved to `out` (kept if it exists). progress(step, loss) is called every 20 steps."""
    import torch
    from transformers import get_scheduler

    from lora import load_base_model, load_tokenizer
    from pipelines.config.schema import DataSection
    from pipelines.data.prepare import MicroBatches, prepare_data

    if (out / "config.json").is_file():
        return out
    init = materialize_tiny_llama(seed=seed)
    tokenizer = load_tokenizer(str(init))
    data_path = materialize_demo_tasks("generic", 8000, seed + 1)
    data = prepare_data(DataSection(path=str(data_path), format="alpaca", max_seq_len=64), tokenizer, seed)
    model = load_base_model(str(init), dtype="fp32")
    model.requires_grad_(True).train()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=min(20, steps // 10), num_training_steps=steps)
    batches = MicroBatches(data.train, 32, seed, tokenizer.pad_token_id)
    for step in range(steps):
        loss = model(**batches[step]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None and step % 20 == 0:
            progress(step, loss.item())

    def fill(d: Path) -> None:
        model.save_pretrained(str(d), safe_serialization=True)
        tokenizer.save_pretrained(str(d))

    out.parent.mkdir(parents=True, exist_ok=True)
    return write_dir_atomic(out, fill, exist_ok=True)


def materialize_tiny_llama_pretrained(root: Optional[Path] = None, seed: int = 0, steps: int = PRETRAIN_STEPS) -> Path:
    """builtin:tiny-llama after `steps` of pretraining on the generic tasks, on one torch thread:
    the same weights on every machine, and no OpenMP threads spinning on a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain_tiny_llama((root or home()) / f"tiny-llama-pretrained-seed{seed}-steps{steps}", steps, seed)
    finally:
        torch.set_num_threads(threads)


def materialize_demo_tasks(task: Optional[str], n: int, seed: int, root: Optional[Path] = None) -> Path:
    rows = demo_rows(task, n=n, seed=seed)

    def build(out: Path) -> None:
        with (out / "data.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    return write_dir_atomic((root or home()) / f"demo-tasks-{task or 'all'}-{n}-seed{seed}", build, exist_ok=True) / "data.jsonl"


def resolve_builtins(cfg):
    """A copy of cfg whose builtin: paths point at materialised local files."""
    cfg = cfg.model_copy(deep=True)
    if cfg.model.path == TINY_LLAMA:
        cfg.model.path = str(materialize_tiny_llama(seed=0))
    elif cfg.model.path == TINY_LLAMA_PRETRAINED:
        cfg.model.path = str(materialize_tiny_llama_pretrained(seed=0))
    elif cfg.model.path.startswith("builtin:"):
        raise UserError(f"model.path={cfg.model.path!r} is not a builtin; the builtin models are "
                        f"{', '.join(BUILTIN_MODELS)}")
    data = cfg.data
    if data.path == DEMO_TASKS:
        n = data.max_examples or 2000
        data.path = str(materialize_demo_tasks(data.task, n, cfg.seed))
        data.task = None  # the materialised file holds exactly that task's rows
    elif data.task is not None:
        raise UserError(f"data.task={data.task!r} only applies to data.path={DEMO_TASKS}")
    for source in data.datasets or []:
        if source.path == DEMO_TASKS:
            source.path = str(materialize_demo_tasks(None, source.max_examples or 2000, cfg.seed))
    for path in [s.path for s in data.sources()]:
        if path.startswith("builtin:"):
            raise UserError(f"data path {path!r} is not a builtin; the builtin dataset is {DEMO_TASKS}")
    return cfg
