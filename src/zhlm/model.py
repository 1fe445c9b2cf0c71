"""A Llama-architecture decoder with Hugging Face `LlamaForCausalLM` names.

RMSNorm, rotary embeddings (the rotate-half layout HF uses), SwiGLU, optional
grouped-query attention and optionally tied embeddings. Parameter names and
config keys are HF's, so a saved folder loads in `transformers` unchanged and
gives the same logits. Attention goes through `scaled_dot_product_attention`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from zhlm.io import atomic_path, write_json


@dataclass
class ModelConfig:
    vocab_size: int = 8000
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int = 6
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    def to_hf(self) -> dict:
        """The config.json of an equivalent `LlamaForCausalLM`."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", **asdict(self),
            "head_dim": self.head_dim, "hidden_act": "silu", "attention_bias": False,
            "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
            "rope_scaling": None, "torch_dtype": "float32", "use_cache": True,
        }

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})

    def num_parameters(self) -> int:
        h, i, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + L * per_layer + h


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in float32 as HF does, then cast back before the weight.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(config: ModelConfig, positions: torch.Tensor):
    """cos, sin of shape positions.shape + (head_dim,), HF's rotate-half layout."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, heads, T, hd); cos/sin: (B, T, hd)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys and values for every layer: (layers, B, kv_heads, max_len, head_dim)."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k, v):
        t = k.shape[2]
        self.k[layer, :, :, self.length:self.length + t] = k
        self.v[layer, :, :, self.length:self.length + t] = v
        end = self.length + t
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        h, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, h, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        groups = c.num_attention_heads // c.num_key_value_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    """The decoder. Named `model.*` / `lm_head` inside, as `LlamaForCausalLM` is."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def forward(self, input_ids, *, positions=None, mask=None, cache: KVCache | None = None,
                last_only: bool = False):
        """Logits for `input_ids` (B, T).

        Without `mask`, attention is causal over the sequence (plus the cache).
        `mask` (B, 1, T, T_total; True = attend) and `positions` (B, T) serve
        left-padded batches during generation.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        if mask is None and cache is not None and start > 0 and T > 1:
            # Causal within the new tokens, full view of the cache.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=input_ids.device).tril(start)
        cos, sin = rope_tables(self.config, positions)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 × matmul parameters + attention (the PaLM estimate)."""
        c = self.config
        norms = c.hidden_size * (2 * c.num_hidden_layers + 1)
        # With untied embeddings the input embedding is a lookup, not a matmul.
        lookup = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
        matmul_params = c.num_parameters() - norms - lookup
        return 6 * matmul_params + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def save_model(model: LlamaModel, out_dir: str | os.PathLike) -> None:
    """config.json + model.safetensors, each written atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    write_json(model.config.to_hf(), out_dir / "config.json")
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def load_model(model_dir: str | os.PathLike, device="cpu") -> LlamaModel:
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    model = LlamaModel(config)
    state = load_file(str(model_dir / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"{model_dir}: missing weights {missing}, unexpected {unexpected}")
    return model.to(device)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_pretrained(model: LlamaModel, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                    *, eos_token_ids: list[int], max_new_tokens: int = 256) -> None:
    """A complete Hugging Face model folder: weights, config, generation config, tokenizer files."""
    import shutil

    out_dir = Path(out_dir)
    save_model(model, out_dir)
    write_json({"bos_token_id": model.config.bos_token_id, "eos_token_id": eos_token_ids,
                "pad_token_id": model.config.pad_token_id, "do_sample": False,
                "max_new_tokens": max_new_tokens}, out_dir / "generation_config.json")
    for name in TOKENIZER_FILES:
        with atomic_path(out_dir / name) as tmp:
            shutil.copyfile(Path(tokenizer_dir) / name, tmp)
