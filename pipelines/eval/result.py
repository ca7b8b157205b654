"""One model's metrics on one suite, as cached and recorded."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class EvalResult:
    metrics: dict[str, float]
    fingerprint: str
    digest: str            # content digest of the weights evaluated
    tokenizer: str         # digest of the tokenizer (results of different tokenizers never compare)
    target: str            # label: "name vN", a run dir, or base:...
    kind: str              # adapter | merged | base
    seconds: float = 0.0
    computed: bool = field(default=False, compare=False)  # False: read from a cache

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "computed"}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EvalResult":
        return cls(**json.loads(text))
