"""The run directory: the contract between training and every later stage.

<run_dir>/config.yaml    resolved config          <run_dir>/metrics.json  final figures
<run_dir>/adapter/       PEFT adapter             <run_dir>/lineage.json  where it came from
<run_dir>/digests.json   SHA-256 of every file    <run_dir>/COMPLETE      written last
A full fine-tuning run (method=full) holds model/ (config.json, model.safetensors, tokenizer files)
in place of adapter/.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines.core.errors import UserError
from pipelines.core.files import sha256_file, write_dir_atomic

COMMON = ("config.yaml", "metrics.json", "lineage.json")
# The weights folder of each kind of run and the files it must hold.
WEIGHTS = {"adapter": ("adapter", ("adapter_config.json", "adapter_model.safetensors")),
           "full": ("model", ("config.json", "model.safetensors"))}
# The adapter run's contract (the common case); `contract(kind)` for either.
CONTRACT = ("config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            "metrics.json", "lineage.json")


def contract(kind: str) -> tuple[str, ...]:
    folder, files = WEIGHTS[kind]
    return (*COMMON, *(f"{folder}/{f}" for f in files))


def kind_of(path: Path) -> str:
    """"full" when the run directory holds model/ (method=full), else "adapter"."""
    return "full" if (Path(path) / WEIGHTS["full"][0]).is_dir() else "adapter"
MARKER = "COMPLETE"
REQUIRED_METRICS = ("train_loss", "eval_loss", "eval_perplexity", "tokens_per_s", "train_steps", "peak_memory_bytes")


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (MARKER, "digests.json")}


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """A complete run directory, or a one-line UserError saying what is wrong."""
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"run directory not found: {p}")
        if not (p / MARKER).is_file():
            raise UserError(f"{p} is not a complete run directory (no {MARKER} marker: interrupted or not a run)")
        missing = [f for f in contract(kind_of(p)) if not (p / f).is_file()]
        if missing:
            raise UserError(f"run directory {p} is missing {', '.join(missing)}")
        return cls(p)

    @staticmethod
    def is_complete(path: str | Path) -> bool:
        """Written to the end (the marker is the last file a run directory gets)."""
        return (Path(path) / MARKER).is_file()

    @property
    def kind(self) -> str:
        """"adapter" (LoRA/QLoRA: adapter/) or "full" (full fine-tuning: model/)."""
        return kind_of(self.path)

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def model(self) -> Path:
        """The whole trained model of a full fine-tuning run (stock transformers folder)."""
        return self.path / "model"

    @property
    def weights(self) -> Path:
        """adapter/ or model/, whichever this run trained."""
        return self.path / WEIGHTS[self.kind][0]

    @property
    def weights_file(self) -> str:
        """The weights file (relative) whose digest names this run's trained weights."""
        folder, files = WEIGHTS[self.kind]
        return f"{folder}/{files[1]}"

    def config(self):
        from pipelines.config.load import config_from_yaml_text

        return config_from_yaml_text((self.path / "config.yaml").read_text())

    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    def lineage(self) -> dict:
        return json.loads((self.path / "lineage.json").read_text())

    def history(self) -> list[dict]:
        """Every metrics report of the run, in step order (what MLflow should hold)."""
        f = self.path / "history.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines() if line] if f.is_file() else []

    def digest_of(self, rel: str) -> str:
        recorded = json.loads((self.path / "digests.json").read_text())
        return recorded.get(rel) or sha256_file(self.path / rel)

    def verify_digests(self) -> None:
        """Every file still has the digest recorded at write time (checked before registering)."""
        recorded = json.loads((self.path / "digests.json").read_text()) if (self.path / "digests.json").is_file() else {}
        if not recorded:
            raise UserError(f"run directory {self.path} has no digests.json")
        for rel, want in recorded.items():
            f = self.path / rel
            if not f.is_file() or sha256_file(f) != want:
                raise UserError(f"run directory {self.path}: {rel} does not match its recorded SHA-256 (modified or corrupt)")


def write_atomic_dir(target: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temp sibling, add digests and the marker last, then rename into place."""
    def fill_and_seal(d: Path) -> None:
        fill(d)
        (d / "digests.json").write_text(json.dumps(digests(d), indent=2))
        (d / MARKER).write_text("")

    try:
        return write_dir_atomic(Path(target), fill_and_seal)
    except FileExistsError:
        raise UserError(f"{target} already exists; choose another run.name or remove it") from None


def write_run_dir(target: Path, *, config_yaml: str, metrics: dict, lineage: dict, weights_src: Path | None = None,
                  kind: str = "adapter", extra_files: dict[str, str] | None = None,
                  adapter_src: Path | None = None) -> RunDir:
    """`weights_src`: the trained adapter (kind "adapter") or whole model (kind "full") folder;
    `adapter_src` is the older name of weights_src for an adapter."""
    if kind not in WEIGHTS:
        raise ValueError(f"run kind {kind!r}: choose {' or '.join(WEIGHTS)}")
    src = weights_src if weights_src is not None else adapter_src
    if src is None:
        raise ValueError("write_run_dir needs weights_src (the adapter or model folder)")

    def fill(d: Path) -> None:
        (d / "config.yaml").write_text(config_yaml)
        shutil.copytree(src, d / WEIGHTS[kind][0])
        (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (d / "lineage.json").write_text(json.dumps(lineage, indent=2))
        for name, text in (extra_files or {}).items():
            (d / name).write_text(text)

    return RunDir(write_atomic_dir(target, fill))
