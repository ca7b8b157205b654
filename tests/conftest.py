"""Shared test fixtures: quiet libraries, no hub, a private LORAPIPE_HOME, tiny models built locally.

Everything here is generic (used by unit and integration tests alike) and cheap: a fixture that
builds a model only runs when a test asks for it, and builds it once per session.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

# Set before transformers / datasets / deepspeed are imported by any test module.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: nothing here may download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Built-in assets (builtin:tiny-llama, builtin:demo-tasks) go to a private home for the whole
# session, never to the working tree's ./.lorapipe. Set at import, so that subprocesses started
# by tests (the CLI) inherit it too; restored when the session ends.
_PREVIOUS_HOME = os.environ.get("LORAPIPE_HOME")
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="lorapipe-home-"))
os.environ["LORAPIPE_HOME"] = str(_SESSION_HOME)

# The small shape the unit tests use: fast on 2 CPU cores, still a real Llama.
SMALL_SHAPE = dict(hidden=64, layers=2, heads=4, intermediate=128, max_positions=128)

_THREADS_SET = False


def _limit_torch_threads() -> None:
    """Tiny models gain nothing from intra-op threads, and on a small shared machine OpenMP
    spin-waiting makes a 64-wide matmul ~100x slower with 2 threads than with 1. Only this
    process is affected (Ray workers and CLI subprocesses choose their own threads). Applied
    once torch has been imported by someone, so torch-free test runs do not pay its import.
    LORAPIPE_TEST_TORCH_THREADS=0 keeps torch's default."""
    global _THREADS_SET
    if _THREADS_SET or "torch" not in sys.modules:
        return
    threads = int(os.environ.get("LORAPIPE_TEST_TORCH_THREADS", "1"))
    if threads > 0:
        sys.modules["torch"].set_num_threads(threads)
    _THREADS_SET = True


def pytest_collection_finish(session):
    _limit_torch_threads()


def pytest_runtest_setup(item):
    _limit_torch_threads()


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
    if _PREVIOUS_HOME is None:
        os.environ.pop("LORAPIPE_HOME", None)
    else:
        os.environ["LORAPIPE_HOME"] = _PREVIOUS_HOME


@pytest.fixture(scope="session")
def lorapipe_home() -> Path:
    """The session's LORAPIPE_HOME (a temporary directory)."""
    return _SESSION_HOME


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The word-level tokenizer the builtin model uses (with the tiny chat template).
    Session-scoped: do not mutate it; build your own with lora.tiny.train_word_tokenizer."""
    from lora.tiny import train_word_tokenizer
    from pipelines.data.builtin import tokenizer_corpus

    return train_word_tokenizer(tokenizer_corpus())


@pytest.fixture(scope="session")
def small_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random-init Llama (hidden 64, 2 layers) + the word tokenizer, saved in HF format."""
    from lora.tiny import build_tiny_llama

    out = tmp_path_factory.mktemp("small-llama")
    tok = tiny_tokenizer
    model = build_tiny_llama(len(tok), seed=0, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, **SMALL_SHAPE)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def builtin_tiny_llama_dir(tmp_path_factory) -> Path:
    """The exact builtin:tiny-llama (pipelines.data.builtin.TINY_SHAPE), materialised in a tmp dir."""
    from pipelines.data.builtin import materialize_tiny_llama

    return materialize_tiny_llama(root=tmp_path_factory.mktemp("builtin"))


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name='data.jsonl') -> Path: one JSON object per line (str rows verbatim)."""

    def write(rows, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        path.write_text("\n".join(lines) + ("\n" if lines else ""))
        return path

    return write
