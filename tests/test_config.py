"""The schema is the one source of defaults: the library's settings dataclasses carry the same."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from zhlm.eval.run import EvalConfig
from zhlm.model import ModelConfig
from zhlm.train.loop import TrainConfig
from zhlm.train.rollouts import RolloutConfig

SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())


def schema_defaults(section: dict) -> dict:
    return {key: spec["default"] for key, spec in section["properties"].items()}


def dataclass_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("cls, section, every_field", [
    (TrainConfig, SCHEMA["definitions"]["training"], True),
    (EvalConfig, SCHEMA["properties"]["eval"], True),
    (RolloutConfig, SCHEMA["properties"]["rollouts"], True),
    # The model's config also holds what the data decides (vocab_size, token ids), not in the schema.
    (ModelConfig, SCHEMA["properties"]["model"], False),
], ids=["training", "eval", "rollouts", "model"])
def test_dataclass_defaults_are_the_schemas(cls, section, every_field):
    schema, ours = schema_defaults(section), dataclass_defaults(cls)
    assert set(schema) <= set(ours), f"{cls.__name__} lacks {sorted(set(schema) - set(ours))}"
    if every_field:
        assert set(ours) == set(schema), f"{cls.__name__} has keys the schema lacks: {sorted(set(ours) - set(schema))}"
    for key, value in schema.items():
        assert ours[key] == value and type(ours[key]) is type(value), (
            f"{cls.__name__}.{key} defaults to {ours[key]!r}, the schema to {value!r}")
