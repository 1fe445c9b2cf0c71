"""The schema is the one source of defaults: the library's settings dataclasses carry the same.
And the rules between a config's keys, which the schema cannot say, fail naming the keys."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from zhlm.config import TRAINING_STAGES, ConfigError, check_yaml_file, config_errors, finetune_settings
from zhlm.eval.retrieval import RetrievalEvalConfig
from zhlm.eval.run import EvalConfig
from zhlm.export import ExportConfig
from zhlm.model import ModelConfig
from zhlm.train.loop import TrainConfig
from zhlm.train.lora import LoraSettings
from zhlm.train.phases import Phase
from zhlm.train.rollouts import RolloutConfig

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())


def schema_defaults(section: dict) -> dict:
    """Every property's default; a required property has none."""
    return {key: spec["default"] for key, spec in section["properties"].items()
            if key not in section.get("required", ())}


def dataclass_defaults(cls) -> dict:
    """Each field's default, made by its factory where it has one (a list)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    return defaults | {f.name: f.default_factory() for f in dataclasses.fields(cls)
                       if f.default_factory is not dataclasses.MISSING}


@pytest.mark.parametrize("cls, section, every_field", [
    (TrainConfig, SCHEMA["definitions"]["training"], True),
    (LoraSettings, SCHEMA["definitions"]["lora"], True),
    (Phase, SCHEMA["definitions"]["phase"], True),
    (EvalConfig, SCHEMA["properties"]["eval"], True),
    (RolloutConfig, SCHEMA["properties"]["rollouts"], True),
    (RetrievalEvalConfig, SCHEMA["properties"]["retrieval"], True),
    (ExportConfig, SCHEMA["properties"]["export"], True),
    # The model's config also holds what the data decides (vocab_size, token ids), not in the schema.
    (ModelConfig, SCHEMA["properties"]["model"], False),
], ids=["training", "lora", "phase", "eval", "rollouts", "retrieval", "export", "model"])
def test_dataclass_defaults_are_the_schemas(cls, section, every_field):
    schema, ours = schema_defaults(section), dataclass_defaults(cls)
    assert set(schema) <= set(ours), f"{cls.__name__} lacks {sorted(set(schema) - set(ours))}"
    if every_field:
        assert set(ours) == set(schema), f"{cls.__name__} has keys the schema lacks: {sorted(set(ours) - set(schema))}"
    for key, value in schema.items():
        assert ours[key] == value and type(ours[key]) is type(value), (
            f"{cls.__name__}.{key} defaults to {ours[key]!r}, the schema to {value!r}")


# --- the rules between keys (zhlm.config), which the Snakefile checks before any job --------

TINY = yaml.safe_load((Path(__file__).resolve().parent / "tiny.yaml").read_text())


def with_defaults(config: dict) -> dict:
    """`config` with the schema's defaults filled in, as the Snakefile's validate leaves it."""
    config = json.loads(json.dumps(config))
    for section in ("model", *TRAINING_STAGES):
        spec = SCHEMA["properties"][section]
        spec = SCHEMA["definitions"]["training"] if "$ref" in spec else spec
        config[section] = {**schema_defaults(spec), **config.get(section, {})}
    finetune = SCHEMA["properties"]["finetune"]  # the training settings and its own keys
    config["finetune"] = {**schema_defaults(SCHEMA["definitions"]["training"]), **schema_defaults(finetune),
                          **config.get("finetune", {})}
    return config


def test_the_finetune_section_is_the_training_settings_and_its_own_keys():
    finetune = SCHEMA["properties"]["finetune"]
    assert finetune["$ref"] == "#/definitions/training" and finetune["unevaluatedProperties"] is False
    assert schema_defaults(finetune) == {"init": "results/dpo", "sources": []}  # no sources: no stage
    settings = finetune_settings(with_defaults(TINY)["finetune"])
    assert set(settings) == set(schema_defaults(SCHEMA["definitions"]["training"]))
    assert TrainConfig(**settings).steps == TINY["finetune"]["steps"]  # what the finetune stage trains with


# Each impossible shape or length, the keys its message names, and the values it shows.
BROKEN = {
    "heads do not divide hidden_size": ({"model": {"hidden_size": 30}},
                                        "model.hidden_size (30) must be divisible by model.num_attention_heads (4)"),
    "kv heads do not divide heads": ({"model": {"num_key_value_heads": 3}},
                                     "model.num_attention_heads (4) must be divisible by "
                                     "model.num_key_value_heads (3)"),
    "odd head size": ({"model": {"hidden_size": 36}},
                      "model.hidden_size / model.num_attention_heads (36 / 4 = 9)"),
    **{f"{stage} seq_len past the context": ({stage: {"seq_len": 65}},
                                             f"{stage}.seq_len (65) must not exceed model.max_position_embeddings (64)")
       for stage in TRAINING_STAGES},
    "lora in pretraining": ({"pretrain": {"lora": {}}}, "pretrain.lora must be null"),
    "batch not split evenly": ({"sft": {"global_batch": 6, "micro_batch": 4}},
                               "sft.global_batch (6) must be divisible by sft.micro_batch × sft.nproc × sft.nodes "
                               "(4 × 1 × 1 = 4)"),
    "batch not split over processes": ({"dpo": {"global_batch": 4, "micro_batch": 2, "nproc": 2, "nodes": 2}},
                                       "dpo.global_batch (4) must be divisible by dpo.micro_batch × dpo.nproc × "
                                       "dpo.nodes (2 × 2 × 2 = 8)"),
    "phases not adding up to the steps": ({"pretrain": {"phases": [{"steps": 4}, {"steps": 3}]}},
                                          "pretrain.phases' steps add up to 7 (4 + 3), not pretrain.steps (6)"),
    "a mixture of an unknown source": ({"pretrain": {"phases": [{"steps": 6, "mixture": {"demo_idioms": 1,
                                                                                         "wiki": 2}}]}},
                                       "pretrain.phases[0].mixture names 'wiki', which is not a pretrain source "
                                       "of the config: one of demo_news, demo_reviews, demo_idioms"),
    "a weight that is not positive": ({"pretrain": {"phases": [{"steps": 2}, {"steps": 4, "mixture": {
                                          "demo_news": 0}}]}},
                                      "pretrain.phases[1].mixture.demo_news (0) must be a positive weight"),
    "retrieval documents not a pretrain source": ({"retrieval": {"docs": "demo_idiom_tasks"}},
                                                  "retrieval.docs ('demo_idiom_tasks') must name a pretrain source"),
    "finetune on a source that is not sft": ({"finetune": {"sources": ["demo_news"]}},
                                            "finetune.sources: 'demo_news' must name an sft source of the config"),
    "finetune seq_len past this run's context": ({"finetune": {"seq_len": 65}},
                                                 "finetune.seq_len (65) must not exceed model.max_position_embeddings"),
    "finetune mixing this run's text into another run's model": (
        {"finetune": {"init": "/models/other", "pretrain_mix": 0.2, "sft_mix": 0.0}},
        "finetune.pretrain_mix needs finetune.init in this run's results/ (not '/models/other')"),
}


# More rules, checked here only (BROKEN is also run through Snakemake).
BROKEN_MORE = {
    "a mixture of an sft source": ({"pretrain": {"phases": [{"steps": 6, "mixture": {"demo_polarity": 1}}]}},
                                   "pretrain.phases[0].mixture names 'demo_polarity', which is not a pretrain source"),
    "an empty mixture": ({"pretrain": {"phases": [{"steps": 6, "mixture": {}}]}},
                         "pretrain.phases[0].mixture is empty"),
    "phases in sft": ({"sft": {"phases": [{"steps": 4}]}}, "sft.phases must be null"),
    "sft_mix in sft": ({"sft": {"sft_mix": 0.2}}, "sft.sft_mix must be 0"),
    "anchor_weight in sft": ({"sft": {"anchor_weight": 1.0}}, "sft.anchor_weight must be 0"),
    "unlikelihood_weight in pretrain": ({"pretrain": {"unlikelihood_weight": 1.0}},
                                        "pretrain.unlikelihood_weight must be 0"),
    "nothing of the finetune's own left": ({"finetune": {"pretrain_mix": 0.5, "sft_mix": 0.5}},
                                           "finetune.pretrain_mix (0.5) + finetune.sft_mix (0.5) must be below 1"),
    "rollouts of the finetune's source": ({"rollouts": {"sources": ["demo_polarity", "demo_entities"]}},
                                          "rollouts.sources: 'demo_entities' must name an sft source of the sft "
                                          "stage: one of demo_idiom_tasks, demo_polarity, demo_segmentation"),
    "rollouts of a pretrain source": ({"rollouts": {"sources": ["demo_news"]}},
                                      "rollouts.sources: 'demo_news' must name an sft source of the sft stage"),
}


def broken_config(change: dict) -> dict:
    config = json.loads(json.dumps(TINY))
    for section, values in change.items():
        config[section] = {**config[section], **values}
    return config


def test_the_tiny_and_default_configs_can_train():
    for path in ("tests/tiny.yaml", "config/config.yaml", "config/zh-0.1b.yaml"):
        config = yaml.safe_load((REPO / path).read_text())
        assert config_errors(with_defaults(config)) == [], path


@pytest.mark.parametrize("change, message", [*BROKEN.values(), *BROKEN_MORE.values()],
                         ids=[*BROKEN, *BROKEN_MORE])
def test_a_config_that_cannot_train_is_named_by_its_keys(change, message):
    errors = config_errors(with_defaults(broken_config(change)))
    assert len(errors) == 1 and errors[0].startswith(message), errors


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text('sources:\n  a: {kind: pretrain, uri: "demo:news"\nmodel: {hidden_size: 32}\n')
    with pytest.raises(ConfigError) as error:
        check_yaml_file(path)
    assert str(error.value).startswith(f"{path}, line 3, column 1: expected ',' or '}}'"), error.value
    path.write_text("sources:\n\tdemo: {}\n")  # a tab
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}, line 2, column 1: found character '\\t'"):
        check_yaml_file(path)
    path.write_text(yaml.safe_dump(TINY))
    check_yaml_file(path)  # a valid file passes
    check_yaml_file(tmp_path / "missing.yaml")  # Snakemake reports a missing file itself
