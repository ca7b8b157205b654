"""What one server can hold: adapters of one base, loaded one way; a merged model alone; no DoRA."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.artifacts.resolve import ResolvedModel
from pipelines.config.load import load_config
from pipelines.core.errors import UserError
from pipelines.serve.catalog import ServedModel, adapter_rank, check_kinds, check_loading, check_on_base

ROOT = Path(__file__).resolve().parents[2]


def _served(tmp: Path, name: str, *, kind: str = "adapter", quantization: str = "nf4", dora: bool = False,
            base_sha256: str = "aa", base_path: str = "/m/base") -> ServedModel:
    d = tmp / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"v_proj": 4}, "use_dora": dora}))
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", [f"model.quantization={quantization}"])
    r = ResolvedModel(ref=f"models:/{name}/1", kind=kind, config=cfg, base_path=base_path, base_sha256=base_sha256,
                      digest="d", adapter_path=d if kind == "adapter" else None, model_path=d if kind == "merged" else None)
    return ServedModel(name, r.ref, r, adapter_rank(d))


def test_adapters_of_another_base_are_refused_naming_both_digests(tmp_path):
    ok, other = _served(tmp_path, "a", base_sha256="aa" * 32), _served(tmp_path, "b", base_sha256="bb" * 32)
    check_on_base(ok.resolved, "/m/base", "aa" * 32)
    with pytest.raises(UserError, match=r"models:/b/1: trained on base /m/base \(sha256 bbbbbbbbbbbb\), not on the served"):
        check_on_base(other.resolved, "/m/base", "aa" * 32)
    hub = _served(tmp_path, "c", base_sha256=None, base_path="org/model")  # a hub id has no digest: the id decides
    check_on_base(hub.resolved, "org/model", None)
    with pytest.raises(UserError):
        check_on_base(hub.resolved, "org/other", None)


def test_one_base_is_loaded_one_way(tmp_path):
    check_loading([_served(tmp_path, "a"), _served(tmp_path, "b")])
    with pytest.raises(UserError, match="one server loads its base one way"):
        check_loading([_served(tmp_path, "c"), _served(tmp_path, "d", quantization="none")])


def test_merged_models_are_served_alone_and_dora_is_refused(tmp_path):
    merged = _served(tmp_path, "m", kind="merged")
    check_kinds([merged])
    with pytest.raises(UserError, match="served alone"):
        check_kinds([_served(tmp_path, "a"), merged])
    with pytest.raises(UserError, match="DoRA"):
        check_kinds([_served(tmp_path, "dora", dora=True)])


def test_rank_is_the_largest_of_r_and_rank_pattern(tmp_path):
    assert _served(tmp_path, "a").rank == 8
    d = tmp_path / "big"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 64}}))
    assert adapter_rank(d) == 64
