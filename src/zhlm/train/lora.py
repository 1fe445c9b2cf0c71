"""LoRA adapters for SFT and DPO, through peft: add one to a model, save it, load it, merge it.

zhlm's decoder has transformers' LlamaForCausalLM module names, so peft's LoRA layers go
into it as they would into the transformers model (`inject_adapter_in_model`), and an
adapter saved here is one that `PeftModel.from_pretrained(transformers_model, folder)` loads:
adapter_config.json and adapter_model.safetensors, its keys prefixed `base_model.model.` as
peft saves a transformers model's adapter. A stage with LoRA writes that folder; merging it
into its base model (`merge_folder`) gives an ordinary model folder for every later stage.

peft (which imports transformers) is imported only where an adapter is used.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from zhlm.io import atomic_path, write_bytes, write_json
from zhlm.model import load_model, save_pretrained
from zhlm.tokenizer.chat import chat_stop_ids

# LoRA's factors are named lora_A and lora_B (peft's LoraModel.prefix): what tells them from base weights.
ADAPTER_PREFIX = "lora_"
# The prefix of an adapter's weight names in peft's files: PeftModel wraps the transformers model
# in a LoraModel (base_model), which holds it as `model`.
SAVED_PREFIX = "base_model.model."
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """A stage's `lora` settings: the schema's `lora` definition, with its defaults."""
    r: int = 8                      # rank of each adapter: the update of a (out, in) matrix is B (out, r) @ A (r, in)
    alpha: int = 16                 # the update is scaled by alpha / r
    dropout: float = 0.0            # dropout on the adapters' input
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))


def is_adapter_parameter(name: str) -> bool:
    return ADAPTER_PREFIX in name


def peft_config(settings: LoraSettings, base_model: str | None = None):
    """peft's LoraConfig for `settings`; base_model (the folder the adapter is trained on) is
    recorded in adapter_config.json, where AutoPeftModelForCausalLM looks for it."""
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model)


def add_adapter(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Wrap the target linears of `model` (in place) in LoRA layers; only the adapters train.

    Each B starts at zero (peft's default), so the model's output is at first unchanged.
    """
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(peft_config(settings), model)
    assert all(p.requires_grad == is_adapter_parameter(n) for n, p in model.named_parameters()), (
        "peft left base weights trainable or adapters frozen")
    return model


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under the names peft saves them with."""
    from peft import get_peft_model_state_dict

    return {SAVED_PREFIX + k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model: torch.nn.Module, out_dir: str | os.PathLike, settings: LoraSettings,
                 base_model: str | os.PathLike) -> None:
    """adapter_model.safetensors and adapter_config.json in out_dir, as peft writes them (each atomically)."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    write_bytes(out_dir / "adapter_model.safetensors", save(adapter_state(model), metadata={"format": "pt"}))
    # peft's own save_pretrained writes the same dict; its target_modules is a set, listed here sorted.
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in
              peft_config(settings, str(base_model)).to_dict().items()}
    write_json(config, out_dir / "adapter_config.json")


def load_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike) -> torch.nn.Module:
    """`model` (in place) with the adapter saved in adapter_dir added to it."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    model = inject_adapter_in_model(LoraConfig.from_pretrained(str(adapter_dir)), model)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    state = {k.removeprefix(SAVED_PREFIX): v for k, v in saved.items()}
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if is_adapter_parameter(k)]
    if result.unexpected_keys or missing:
        raise ValueError(f"{adapter_dir}: adapter weights missing {missing}, unexpected {result.unexpected_keys}")
    return model


@torch.no_grad()
def merge_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each adapter into its base weight (W + alpha / r · B @ A) and put the plain linear
    back in its place: the model has its original modules and parameter names again."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    return model


def merge_folder(base_dir, adapter_dir, tokenizer_dir, out_dir) -> None:
    """The model folder of base_dir with the adapter of adapter_dir merged in, written to out_dir
    as SFT and DPO write theirs (a chat model's stop tokens), with the adapter's training log and
    loss curve: an ordinary folder of the stage."""
    model = merge_adapter(load_adapter(load_model(base_dir), adapter_dir))
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    save_pretrained(model, out_dir, tokenizer_dir, eos_token_ids=chat_stop_ids(tokenizer))
    for name in ("train_log.csv", "loss.png"):
        with atomic_path(Path(out_dir) / name) as tmp:
            shutil.copyfile(Path(adapter_dir) / name, tmp)

