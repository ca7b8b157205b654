"""`lorapipe pipeline`: tune (if the config has a tune section) -> the best trial's own run
directory when it ran to max_steps (else train the best config) -> register -> promote to
`candidate`, and to `champion` only through the gate on the model's eval suite."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pipelines.config.schema import PipelineConfig


@dataclass
class PipelineOutcome:
    run_path: str
    model_name: str
    version: str
    champion: bool
    lines: list[str] = field(default_factory=list)


def register_and_promote(run, tracking_uri: Optional[str] = None) -> PipelineOutcome:
    """Register the run (adapter and merged versions), move `candidate` on both, then `champion` on
    both through the gate: the merged model for stock transformers, the adapter for `lorapipe serve`
    (many adapters on one base). A full fine-tuning run has one version (NAME-full) to move."""
    from pipelines.registry.promote import promote
    from pipelines.registry.register import register_run

    uri = tracking_uri or run.config().tracking_uri()
    reg = register_run(run.path, tracking_uri=uri)
    versions = reg.versions()
    lines = ["registered " + " and ".join(f"{name} v{v}" for name, v in versions.items())]
    for name, version in versions.items():
        lines.append(promote(name, version, "candidate", tracking_uri=uri, gated=False).message)
    champions = {name: promote(name, version, "champion", tracking_uri=uri) for name, version in versions.items()}
    lines += [c.message for c in champions.values()]
    whole = f"{reg.name}-full" if reg.full_version is not None else f"{reg.name}-merged"  # the stand-alone model
    return PipelineOutcome(str(run.path), whole, versions[whole], champions[whole].promoted, lines)


def run_pipeline(cfg: PipelineConfig, progress: bool = True) -> PipelineOutcome:
    from pipelines.train.driver import train

    if cfg.tune:
        from pipelines.tune.search import tune

        search = tune(cfg, progress=progress)
        finished = search.finished_best_run()
        if finished is not None:  # the best trial ran to max_steps: register its own run directory
            outcome = register_and_promote(finished)
            outcome.lines.insert(0, f"best trial ran to max_steps: registering its run directory {finished.path}")
            return outcome
        cfg = search.best_config_for_training()
    run = train(cfg, progress=progress)
    return register_and_promote(run)
