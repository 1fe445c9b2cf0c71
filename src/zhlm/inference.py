"""Using a trained model: choose the device, load a model folder, turn generated ids into text.

chat, serve, rollouts and eval all load models and pick devices here, and
training picks its device here too, so "auto" means the same everywhere.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from zhlm.generate import Sampling
from zhlm.model import LlamaForCausalLM, load_model
from zhlm.tokenizer.chat import chat_stop_ids


def pick_device(name: str = "auto") -> torch.device:
    """"auto": this process's GPU when there is one (LOCAL_RANK under torchrun), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


@dataclass
class LoadedModel:
    """A model folder ready to generate: the decoder, its tokenizer, stop tokens, sampling defaults."""
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    stop_ids: list[int]
    defaults: Sampling
    name: str

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load(model_dir, device: str | torch.device = "auto") -> LoadedModel:
    """Load a Hugging Face model folder (config.json, model.safetensors, tokenizer.json, ...) in eval mode."""
    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir}: no {name}; expected a model folder such as results/dpo")
    model = load_model(model_dir, pick_device(str(device))).eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id", [])
    eos = eos if isinstance(eos, list) else [eos]
    # The ChatML end of turn first, then whatever else the folder declares as an end.
    stop_ids = list(dict.fromkeys(i for i in [*chat_stop_ids(tokenizer), *eos] if i is not None))
    # Greedy unless the folder asks for sampling, as transformers' generate() does.
    defaults = Sampling(
        max_new_tokens=int(gen.get("max_new_tokens", 256)),
        temperature=float(gen.get("temperature", 1.0)) if gen.get("do_sample") else 0.0,
        top_p=float(gen.get("top_p", 1.0)),
        repetition_penalty=float(gen.get("repetition_penalty", 1.0)),
    )
    return LoadedModel(model, tokenizer, stop_ids, defaults, model_dir.resolve().name)


class TextStream:
    """Generated token ids in, new text out.

    A byte-level token can end in the middle of a multi-byte character, so the
    whole answer so far is decoded each time and only complete new text is
    returned; a trailing replacement character waits for the next token.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        if not text.startswith(self.text):  # cannot happen with a byte-level decoder; stay safe
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self) -> str:
        """What is left at the end (bytes that never made a whole character)."""
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += new
        return new
