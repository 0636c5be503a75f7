"""The typed config machinery: YAML + dotted overrides → dataclasses, one validation pass."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from fgcmr.config import ConfigError, apply_overrides, dump_yaml, load_config


@dataclasses.dataclass
class Inner:
    max_items: int = 10
    ratio: float = 0.5
    names: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Outer:
    source: Literal["a", "b"] = "a"
    out: str | None = None
    flag: bool = False
    data: Inner = dataclasses.field(default_factory=Inner)

    def validate(self) -> None:
        if self.data.max_items <= 0:
            raise ValueError("data.max_items must be positive")


def test_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("source: b\ndata:\n  max_items: 3\n  names: [x, y]\n")
    cfg = load_config(Outer, path, {"data.ratio": "0.25", "flag": "true"})
    assert cfg == Outer(source="b", flag=True, data=Inner(max_items=3, ratio=0.25, names=["x", "y"]))


def test_experiment_section_is_used(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: exp\nshard:\n  source: b\n  data: {max_items: 7}\n")
    assert load_config(Outer, path, section="shard").data.max_items == 7


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"source": "c"}, "source='c' is not allowed; choose one of 'a', 'b'"),
        ({"data.bogus": 1}, "unknown config field 'data.bogus'"),
        ({"data.max_items": "many"}, "data.max_items must be an integer"),
        ({"flag": "perhaps"}, "flag must be true or false"),
        ({"data.max_items": 0}, "data.max_items must be positive"),
        ({"data.max_items.x": 1}, "data.max_items must be an integer"),
    ],
)
def test_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(Outer, None, overrides)


def test_overrides_do_not_mutate_input_and_dump_round_trips(tmp_path):
    data = {"data": {"max_items": 1}}
    apply_overrides(data, {"data.max_items": 2})
    assert data == {"data": {"max_items": 1}}
    cfg = load_config(Outer, None, {"data.names": "p,q"})
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(Outer, path) == cfg


def test_configs_check_themselves_when_built_in_code_too():
    """``Validated`` configs validate in ``__post_init__``: built in code, nested (``ShardConfig.data``, which
    the shard config's own check skipped) or from the command line, an invalid one never exists."""
    from fgcmr.shard.config import DataOptions, ShardConfig
    from fgcmr.train.config import TrainConfig

    with pytest.raises(ValueError, match="needs label sidecars"):
        TrainConfig(shards="s", out="o")  # the weighted loss without --labels
    with pytest.raises(ValueError, match="jpeg_quality=0"):
        ShardConfig(data=DataOptions(jpeg_quality=0))
    with pytest.raises(ConfigError, match=r"^data: jpeg_quality=0 must be in 1\.\.100$"):
        load_config(ShardConfig, None, {"data.jpeg_quality": 0})
    with pytest.raises(ConfigError, match=r"^missing required config field 'out' \(--out=…\)$"):
        load_config(TrainConfig, None, {"shards": "s", "labels": "l"})  # a required path is a required field
    assert TrainConfig(shards="s", out="o", labels="l").out == "o"


def test_label_model_and_index_configs_check_themselves():
    """The labeler's, tokenizer's, model's and index's configs are ``Validated`` too: built in code or loaded,
    an invalid one never exists, and their required paths are required fields."""
    from fgcmr.label.infer import LabelInferConfig
    from fgcmr.label.model import EncoderConfig
    from fgcmr.label.tokenizer import TokenizerConfig
    from fgcmr.label.train import LabelTrainConfig
    from fgcmr.model.config import ImageTowerConfig, ModelConfig, TextTowerConfig
    from fgcmr.retrieval.index import IndexConfig, IndexParams

    for cls, values, message in [
        (LabelTrainConfig, {"shards": "s", "out": "o", "batch_size": 3}, "batch_size=3 must be even"),
        (LabelInferConfig, {"shards": "s", "labeler": "l", "window_batches": 0}, "window_batches=0 must be ≥ 1"),
        (TokenizerConfig, {"shards": "s", "out": "o", "vocab_size": 3}, "vocab_size=3 is too small"),
        (EncoderConfig, {"hidden_size": 10, "num_heads": 4}, "must be divisible by num_heads=4"),
        (ImageTowerConfig, {"kind": "feature"}, "needs image.feature_dim > 0"),
        (TextTowerConfig, {"kind": "transformers"}, "needs text.pretrained_dir or text.config.model_type"),
        (ModelConfig, {"embed_dim": 0}, "embed_dim=0 must be ≥ 1"),
        (IndexConfig, {"embeddings": "e", "out": "o", "target_recall": 2.0}, r"target_recall must be in \(0, 1\]"),
        (IndexParams, {"target_recall": 0.0}, r"target_recall must be in \(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            cls(**values)
    with pytest.raises(ValueError, match=r"^model: hidden_size=10 must be divisible"):
        load_config(LabelTrainConfig, None, {"shards": "s", "out": "o", "model.hidden_size": 10})
    for cls, given, missing in [
        (LabelTrainConfig, {"out": "o"}, "shards"),
        (LabelInferConfig, {"shards": "s"}, "labeler"),
        (TokenizerConfig, {"shards": "s"}, "out"),
        (IndexConfig, {"out": "o"}, "embeddings"),
    ]:
        with pytest.raises(ConfigError, match=rf"^missing required config field '{missing}' \(--{missing}=…\)$"):
            load_config(cls, None, given)


def test_every_shipped_labeler_and_train_config_loads():
    from fgcmr.config import CONFIGS
    from fgcmr.label.train import LabelTrainConfig, earliest_stop
    from fgcmr.train.config import TrainConfig

    for kind, cls, paths in (("labelers", LabelTrainConfig, {}), ("train", TrainConfig, {"labels": "l"})):
        files = sorted((CONFIGS / kind).glob("*.yaml"))
        assert files, kind
        for path in files:
            cfg = load_config(cls, path, {"shards": "s", "out": "o", **paths})
            assert cfg.out == "o", path
            if cls is LabelTrainConfig:  # early stopping can end it before its cap (issue 16)
                assert earliest_stop(cfg) < cfg.max_steps, path
