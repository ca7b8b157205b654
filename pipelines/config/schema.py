"""The run configuration: one pydantic schema, every key declared, unknown keys are errors.

Cross-field rules live here (validators) so that a bad combination fails before Ray starts,
models load or data is read. Derived quantities are methods (`global_batch_size`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from pipelines.config.eval_suite import EvalSection
from pipelines.config.tune_space import TuneSection
from pipelines.core.defaults import catalogued_gpus, default_tracking_uri

DType = Literal["fp32", "bf16", "fp16"]
# lora.target_modules presets; what each means on a model is lora.targets' business (PRESETS there).
TargetPreset = Literal["q", "qk", "qkv", "qkvo", "mlp", "all-linear"]
TARGET_PRESETS = get_args(TargetPreset)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ShapeSection(Section):
    """Architecture figures for planning when no config.json is reachable (Llama-style decoder)."""

    hidden_size: int = Field(gt=0, description="model width")
    intermediate_size: int = Field(gt=0, description="MLP width")
    num_hidden_layers: int = Field(gt=0, description="decoder layers")
    num_attention_heads: int = Field(gt=0, description="query heads")
    num_key_value_heads: Optional[int] = Field(None, gt=0, description="KV heads (GQA); default = query heads")
    vocab_size: int = Field(gt=0, description="tokens in the vocabulary")
    tie_word_embeddings: bool = Field(False, description="output head shares the embedding matrix")


class ModelSection(Section):
    path: str = Field(description="HF hub id, local model directory, builtin:tiny-llama (random init) or "
                      "builtin:tiny-llama-pretrained")
    dtype: DType = Field("bf16", description="dtype the base is loaded and computed in")
    quantization: Literal["none", "nf4", "fp4"] = Field(
        "nf4", description="'nf4'/'fp4' load the frozen base in 4 bits (QLoRA) via bitsandbytes")
    double_quant: bool = Field(True, description="quantize the 4-bit quantization constants too")
    quant_storage: Optional[DType] = Field(
        None, description="storage dtype of packed 4-bit weights; None = uint8 (ZeRO-3 needs = dtype)")
    trust_remote_code: bool = Field(False, description="run model code shipped with the checkpoint")
    activation_checkpointing: Literal["none", "all", "every_k", "auto"] = Field(
        "none", description="recompute decoder layers in backward: none, all, every checkpoint_every_k-th, or "
        "auto (the fastest setting the plan says fits the device)")
    checkpoint_every_k: int = Field(2, ge=1, description="activation_checkpointing=every_k: checkpoint layers 0, k, 2k, ...")
    attn_implementation: Literal["eager", "sdpa"] = Field("sdpa", description="attention kernel")
    revision: Optional[str] = Field(None, description="hub revision (branch, tag or commit)")
    shape: Optional[ShapeSection] = Field(None, description="architecture for `lorapipe plan` when config.json is unreachable")

    @property
    def is_quantized(self) -> bool:
        return self.quantization != "none"

    @model_validator(mode="before")
    @classmethod
    def _gradient_checkpointing_alias(cls, data):
        """Deprecated `gradient_checkpointing: true|false` = activation_checkpointing all|none; when both are
        given (a preset with the old key, an override with the new one), activation_checkpointing wins."""
        if not isinstance(data, dict) or "gradient_checkpointing" not in data:
            return data
        data = dict(data)
        old = data.pop("gradient_checkpointing")
        if not isinstance(old, bool):
            raise ValueError(f"model.gradient_checkpointing must be true or false, got {old!r}")
        data.setdefault("activation_checkpointing", "all" if old else "none")
        return data

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether any layer may be recomputed (the deprecated boolean's reading)."""
        return self.activation_checkpointing != "none"


class LoraSection(Section):
    r: int = Field(16, gt=0, le=1024, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator (scale = alpha/r, or alpha/sqrt(r) with rsLoRA)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: Union[TargetPreset, list[str]] = Field(
        "all-linear", description="a preset (q, qk, qkv, qkvo, mlp, all-linear: the same roles on any decoder, "
        "e.g. qkv = q_proj/k_proj/v_proj on Llama, c_attn on GPT-2) or module-name suffixes such as [q_proj, v_proj]")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases train")
    plus_lr_ratio: Optional[float] = Field(
        None, gt=0, description="LoRA+: the B matrices (and trainable 1-D params) learn at train.lr times this "
        "(the paper suggests 16); None = one learning rate")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _known_preset(cls, v):
        if isinstance(v, str) and v not in TARGET_PRESETS:
            raise ValueError(f"{v!r} is not a preset; presets: {', '.join(TARGET_PRESETS)} "
                             "(or a list of module names such as [q_proj, v_proj])")
        return v

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("target_modules must name at least one module or be 'all-linear'")
        return v


ChatRole = Literal["system", "user", "assistant"]
DataFormat = Literal["alpaca", "chat", "sharegpt", "text"]
# The fields each format reads from a row; `columns` may map them to other column names.
FORMAT_FIELDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",),
                 "sharegpt": ("conversations",), "text": ("text",)}
RAY_DATA_SUFFIXES = (".jsonl", ".parquet", ".txt")


class ShareGptSection(Section):
    """How sharegpt turns are read: which keys hold the speaker and the text, and what each
    speaker name means (the chat template is rendered with system/user/assistant roles)."""

    role_key: str = Field("from", description="turn key holding the speaker")
    content_key: str = Field("value", description="turn key holding the text")
    roles: dict[str, ChatRole] = Field(
        {"system": "system", "human": "user", "gpt": "assistant"},
        description="speaker name -> system/user/assistant; other names are errors")


class SourceSection(Section):
    """One dataset of a mixture (or the only one, from data.path)."""

    path: str = Field(description="local .json/.jsonl/.parquet/.txt file, a datasets hub name, or builtin:demo-tasks")
    format: DataFormat = Field("alpaca", description="row layout")
    weight: float = Field(1.0, gt=0, description="share of the mixture (normalised over the sources)")
    split: str = Field("train", description="split to read from a hub dataset")
    columns: dict[str, str] = Field(
        {}, description="format field -> column of this file, e.g. {instruction: prompt, output: completion}")
    max_examples: Optional[int] = Field(None, gt=0, description="use at most this many rows of this source")

    @model_validator(mode="after")
    def _columns_are_format_fields(self):
        bad = sorted(set(self.columns) - set(FORMAT_FIELDS[self.format]))
        if bad:
            raise ValueError(f"columns: {bad[0]!r} is not a field of format {self.format}; "
                             f"fields: {', '.join(FORMAT_FIELDS[self.format])}")
        return self


class DataSection(Section):
    path: Optional[str] = Field(None, description="one source: local .json/.jsonl/.parquet/.txt file, a datasets "
                                                  "hub name, or builtin:demo-tasks (or use data.datasets)")
    datasets: Optional[list[SourceSection]] = Field(
        None, description="a weighted mixture of sources, each with its own path/format/weight/columns")
    format: DataFormat = Field("alpaca", description="row layout of data.path")
    split: str = Field("train", description="split to read from a hub dataset")
    text_field: str = Field("text", description="column holding the text for format=text")
    columns: dict[str, str] = Field({}, description="data.path: format field -> column of the file")
    text_unit: Literal["line", "paragraph"] = Field(
        "line", description=".txt files: one document per line, or per blank-line-separated paragraph")
    sharegpt: ShareGptSection = Field(ShareGptSection(), description="sharegpt turn keys and speaker names")
    mix_until: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted", description="mixture ends when the first source runs out, or when all have (oversampling)")
    train_on_prompt: bool = Field(False, description="also compute loss on prompt tokens")
    max_seq_len: int = Field(256, ge=8, le=131072, description="tokens per example after truncation")
    packing: bool = Field(False, description="place whole training examples into max_seq_len blocks "
                                             "(never attending across examples); eval is never packed")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="held-out share for eval")
    max_examples: Optional[int] = Field(None, gt=0, description="use at most this many rows")
    task: Optional[str] = Field(None, description="builtin:demo-tasks only: which task to train on")
    engine: Literal["auto", "driver", "ray"] = Field(
        "auto", description="driver: datasets in the driver; ray: Ray Data streams shards to workers; "
                            "auto: ray when the local files reach ray_min_bytes")
    ray_min_bytes: int = Field(1 << 30, gt=0, description="engine=auto: source size from which Ray Data is used")

    @model_validator(mode="after")
    def _one_way_to_name_data(self):
        if (self.path is None) == (self.datasets is None):
            raise ValueError("give either data.path (one source) or data.datasets (a mixture), not both or neither")
        if self.datasets is not None and not self.datasets:
            raise ValueError("data.datasets is empty; list at least one source")
        if self.path is not None:
            SourceSection(path=self.path, format=self.format, columns=self.columns)  # same column rules
        if self.engine == "ray":
            self._check_ray_sources()
        return self

    def _check_ray_sources(self) -> None:
        if self.datasets is not None and len(self.datasets) > 1:
            raise ValueError("data.engine=ray reads one source; a mixture is prepared with data.engine=driver")
        path = self.sources()[0].path
        if not path.endswith(RAY_DATA_SUFFIXES):
            raise ValueError(f"data.engine=ray reads local {', '.join(RAY_DATA_SUFFIXES)} files; got {path!r}")

    def sources(self) -> list[SourceSection]:
        """The sources to read: data.datasets, or data.path as the one-source case."""
        if self.datasets is not None:
            return list(self.datasets)
        columns = self.columns or ({"text": self.text_field} if self.format == "text" and self.text_field != "text"
                                   else {})
        return [SourceSection(path=self.path, format=self.format, split=self.split, columns=columns)]

    def formats(self) -> set[str]:
        return {s.format for s in self.sources()}


class TrainSection(Section):
    max_steps: int = Field(100, gt=0, description="optimizer steps")
    micro_batch_size: Union[PositiveInt, Literal["auto"]] = Field(
        4, description="examples per worker per forward; auto: the largest divisor of the per-worker batch "
        "(train.global_batch_size / scaling.num_workers) whose planned memory fits, chosen before the run starts "
        "(after the checkpointing when that is auto too); grad_accum makes up the rest")
    grad_accum: Optional[PositiveInt] = Field(
        None, description="micro batches per optimizer step; default 1, or what train.global_batch_size implies")
    global_batch_size: Optional[PositiveInt] = Field(
        None, description="examples per optimizer step over all workers; given, grad_accum follows from it "
        "(needed by micro_batch_size=auto)")
    lr: float = Field(2e-4, gt=0, le=1.0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR schedule after warmup")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    max_grad_norm: float = Field(1.0, ge=0.0, description="clip gradients to this norm (0 = off)")
    eval_every: int = Field(50, gt=0, description="steps between evaluations")
    eval_batches: int = Field(8, gt=0, description="micro batches per evaluation (per worker)")
    report_every: int = Field(10, gt=0, description="steps between ray.train.report calls")
    checkpoint_every: int = Field(50, gt=0, description="steps between checkpoints")
    loss: Literal["plain", "chunked", "fused"] = Field(
        "plain", description="plain: transformers' loss over full fp32 logits; chunked: linear + cross-entropy "
        "loss_chunk_tokens at a time (never the full logits); fused: Liger/cut-cross-entropy on CUDA when "
        "installed, else chunked")
    loss_chunk_tokens: int = Field(1024, gt=0, description="tokens per chunk of the chunked loss")

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be < train.max_steps={self.max_steps}")
        return self


class DeepSpeedSection(Section):
    stage: int = Field(2, ge=0, le=3, description="ZeRO stage 0-3")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="ZeRO-Offload of optimizer states")
    offload_params: Literal["none", "cpu"] = Field("none", description="ZeRO-3 parameter offload")
    overlap_comm: bool = Field(False, description="overlap gradient reduction with backward")

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self):
        if self.offload_params != "none" and self.stage != 3:
            raise ValueError(f"deepspeed.offload_params={self.offload_params} needs deepspeed.stage=3 (got {self.stage})")
        if self.offload_optimizer != "none" and self.stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.stage >= 1")
        return self


class ScalingSection(Section):
    num_workers: int = Field(2, gt=0, description="Ray Train workers (one per GPU)")
    use_gpu: bool = Field(False, description="one GPU per worker, nccl backend")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved (and torch threads) per worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how workers are placed on nodes")
    gpu_kind: Optional[str] = Field(
        None, description="the GPU of configs/gpus/catalogue.yaml the workers get (use_gpu): what the fit verdict "
        "and micro_batch_size=auto plan for; default the catalogue's default_gpu")

    @field_validator("gpu_kind")
    @classmethod
    def _catalogued(cls, v: Optional[str]) -> Optional[str]:
        known = catalogued_gpus()
        if v is not None and v.lower() not in known:
            raise ValueError(f"{v!r} is not in configs/gpus/catalogue.yaml; known: {', '.join(known)}")
        return v.lower() if v else v


class RunSection(Section):
    name: Optional[str] = Field(None, description="run name; default derived from the config name")
    output_dir: str = Field("runs", description="where run directories are written")
    storage_path: Optional[str] = Field(
        None, description="Ray storage for checkpoints: a filesystem path every node sees; default <output_dir>/_ray")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1 = forever)")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints Ray keeps")

    @field_validator("storage_path")
    @classmethod
    def _filesystem_path(cls, v: Optional[str]) -> Optional[str]:
        # Resume, Tune's restore and early-stopped trials read checkpoints as files; an object
        # store would need all of those rewritten (and tested) against a filesystem layer.
        if v and "://" in v:
            raise ValueError(f"{v!r} is a URI; give a filesystem path every node sees (an NFS/PVC mount such as "
                             "/mnt/shared/lorapipe): object stores are not supported for checkpoints")
        return v


class MlflowSection(Section):
    enabled: bool = Field(True, description="log to MLflow from rank 0")
    tracking_uri: Optional[str] = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = Field("lorapipe", description="MLflow experiment name")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, v: Optional[str]) -> Optional[str]:
        # A config is saved beside every checkpoint and logged as an artifact: it must hold no secret.
        from pipelines.core.secrets import redact_uri

        if v and redact_uri(v) != v:
            raise ValueError(f"{redact_uri(v)} carries credentials in the URI; set MLFLOW_TRACKING_USERNAME and "
                             "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead")
        return v


class RegistrySection(Section):
    name: Optional[str] = Field(None, description="registered model base name; default run name")
    gate_metric: str = Field("eval_loss", description="unused since promotion judges on the eval suite "
                             "(eval:, primary/guards); kept so older configs validate")
    gate_mode: Literal["min", "max"] = Field("min", description="unused (see gate_metric)")
    margin: float = Field(0.0, ge=0.0, description="primary-metric margin of the default eval suite (a run without eval:)")
    protected_aliases: list[str] = Field(["champion"], description="aliases only an identity with MANAGE on the "
                                         "registered model may move (champion always is); recorded on the model")


Method = Literal["lora", "qlora", "full"]
FOUR_BIT = ("nf4", "fp4")


class PipelineConfig(Section):
    """A complete run: every top-level preset in configs/ validates against this alone."""

    name: str = Field("run", description="config name, used for run and registry names")
    seed: int = Field(0, ge=0, description="seeds data split, init and dropout")
    method: Method = Field(
        "qlora", description="lora: a 16/32-bit frozen base + adapter; qlora: a 4-bit frozen base + adapter; full: "
        "every weight trains (the lora: section is ignored) and the run directory holds model/, not adapter/. "
        "Default: inferred from model.quantization (nf4/fp4 -> qlora, none -> lora); given without "
        "model.quantization, it sets that (lora/full: none)")
    model: ModelSection
    lora: LoraSection = Field(LoraSection(), description="the adapter (method lora/qlora; ignored by method=full)")
    data: DataSection
    train: TrainSection = TrainSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    mlflow: MlflowSection = MlflowSection()
    registry: RegistrySection = RegistrySection()
    tune: Optional[TuneSection] = Field(None, description="search space and algorithm (lorapipe tune, pipeline)")
    eval: Optional[EvalSection] = Field(None, description="eval suite for eval, the registry gate and tune.rank_by")

    @model_validator(mode="before")
    @classmethod
    def _infer_method(cls, data):
        """No `method:` means what configs meant before it existed: the quantization decides. A
        method without model.quantization sets it (lora, full: none; qlora: the default nf4)."""
        if not isinstance(data, dict):
            return data
        model = data.get("model")
        if data.get("method") is not None:
            if isinstance(model, dict) and "quantization" not in model and data["method"] in ("lora", "full"):
                data = {**data, "model": {**model, "quantization": "none"}}
            return data
        quantization = getattr(model, "quantization", None) if not isinstance(model, dict) else \
            model.get("quantization", ModelSection.model_fields["quantization"].default)
        return {**data, "method": "qlora" if quantization in FOUR_BIT else "lora"}

    @model_validator(mode="after")
    def _cross_field_rules(self):
        m, ds = self.model, self.deepspeed
        self._check_method()
        self._settle_batch()
        if m.is_quantized and ds.stage == 3 and m.quant_storage != m.dtype:
            raise ValueError(
                f"deepspeed.stage=3 with a 4-bit base needs model.quant_storage equal to model.dtype "
                f"({m.dtype}), got {m.quant_storage}: ZeRO-3 can only partition 4-bit weights stored in the load dtype")
        if m.is_quantized and m.dtype == "fp16" and ds.stage > 0:
            raise ValueError("model.dtype=fp16 with a 4-bit base is not supported under DeepSpeed; use bf16 or fp32")
        if self.lora.use_dora and m.is_quantized and ds.stage == 3:
            raise ValueError("lora.use_dora with a 4-bit base under deepspeed.stage=3 is not supported by PEFT; use stage 2")
        if self.train.loss != "plain" and ds.stage == 3:
            # ZeRO-3 partitions the output head; the chunked loss reads its whole weight outside its forward.
            raise ValueError(f"train.loss={self.train.loss} needs deepspeed.stage <= 2 (ZeRO-3 partitions the output "
                             "head's weight); use train.loss=plain with stage 3")
        if self.data.formats() == {"text"} and self.data.train_on_prompt:
            raise ValueError("data.train_on_prompt only applies to alpaca/chat/sharegpt formats (text has no prompt)")
        if self.tune and self.tune.asha.enabled and self.tune.asha.grace_period >= self.train.max_steps:
            raise ValueError(f"tune.asha.grace_period={self.tune.asha.grace_period} must be < "
                             f"train.max_steps={self.train.max_steps}")
        if self.train.eval_every > self.train.max_steps and self.train.max_steps > 1:
            # Without a single eval there is no eval_loss for metrics.json, Tune or the gate.
            raise ValueError(f"train.eval_every={self.train.eval_every} exceeds train.max_steps={self.train.max_steps}: "
                             "no evaluation would run")
        self._check_rank_by()
        return self

    def _check_method(self) -> None:
        """method and model.quantization say the same thing (a user switches methods with both keys)."""
        q = self.model.quantization
        if self.method == "full" and q != "none":
            raise ValueError(f"method=full trains every weight; a 4-bit base cannot be trained: set "
                             f"model.quantization=none (got {q})")
        if self.method == "qlora" and q == "none":
            raise ValueError("method=qlora trains an adapter on a 4-bit base: set model.quantization=nf4 (or fp4), "
                             "or method=lora for a 16/32-bit base")
        if self.method == "lora" and q != "none":
            raise ValueError(f"method=lora keeps the base in model.dtype, but model.quantization={q} loads it in "
                             "4 bits: set model.quantization=none, or method=qlora")
        if self.method == "full" and self.lora.plus_lr_ratio is not None:
            raise ValueError("lora.plus_lr_ratio (LoRA+) sets the learning rate of an adapter's B matrices; "
                             "method=full trains no adapter: remove it, or use method=lora/qlora")

    def _settle_batch(self) -> None:
        """train.grad_accum from train.global_batch_size when that is given (they must agree when both
        are); with micro_batch_size=auto it stays unset until the plan picks the micro batch."""
        t, n = self.train, self.scaling.num_workers
        if t.global_batch_size is None:
            if t.micro_batch_size == "auto":
                raise ValueError("train.micro_batch_size=auto needs train.global_batch_size (examples per optimizer "
                                 "step over all workers): the micro batch is chosen among its divisors")
            if t.grad_accum is None:
                t.grad_accum = 1
            return
        g = t.global_batch_size
        if g % n:
            raise ValueError(f"train.global_batch_size={g} must be a multiple of scaling.num_workers={n}")
        if t.micro_batch_size == "auto":
            if t.grad_accum is not None:
                raise ValueError(f"train.grad_accum={t.grad_accum} is chosen with the micro batch when "
                                 "train.micro_batch_size=auto: remove it (or override train.grad_accum=null)")
            return
        if (g // n) % t.micro_batch_size:
            raise ValueError(f"train.global_batch_size={g} is {g // n} per worker over {n} workers, not a multiple of "
                             f"train.micro_batch_size={t.micro_batch_size}")
        accum = g // n // t.micro_batch_size
        if t.grad_accum is not None and t.grad_accum != accum:
            raise ValueError(f"train.grad_accum={t.grad_accum} disagrees with train.global_batch_size={g} = "
                             f"micro_batch_size {t.micro_batch_size} x grad_accum {accum} x workers {n}: give one of them "
                             "(train.grad_accum=null derives it)")
        t.grad_accum = accum

    def _check_rank_by(self) -> None:
        """tune.rank_by=suite:<metric> needs an eval section; an inline suite must compute the metric."""
        rank_by = self.tune.rank_by if self.tune else None
        if not rank_by:
            return
        if self.eval is None:
            raise ValueError(f"tune.rank_by={rank_by!r} needs an eval: section (suite or suite_file)")
        metric = rank_by.removeprefix("suite:")
        if self.eval.suite is not None and metric not in self.eval.suite.metric_names():
            raise ValueError(f"tune.rank_by={rank_by!r}: the eval suite computes {', '.join(self.eval.suite.metric_names())}")

    # -- derived quantities (one place each) ---------------------------------------------
    @property
    def is_full(self) -> bool:
        """Every weight trains: the run writes a whole model, not an adapter."""
        return self.method == "full"

    def global_batch_size(self) -> int:
        if self.train.micro_batch_size == "auto":
            return self.train.global_batch_size
        return self.train.micro_batch_size * self.train.grad_accum * self.scaling.num_workers

    def batch_per_worker(self) -> int:
        """Examples each worker contributes to one optimizer step."""
        return self.global_batch_size() // self.scaling.num_workers

    def run_name(self) -> str:
        return self.run.name or self.name

    def registry_name(self) -> str:
        return self.registry.name or self.run_name()

    def tracking_uri(self) -> str:
        return default_tracking_uri(self.mlflow.tracking_uri)

    def storage_path(self) -> str:
        path = self.run.storage_path or str(Path(self.run.output_dir) / "_ray")
        return str(Path(path).expanduser().resolve())
