"""A Llama-architecture decoder with Hugging Face `LlamaForCausalLM` names.

RMSNorm, rotary embeddings (the rotate-half layout HF uses), SwiGLU, optional
grouped-query attention and optionally tied embeddings. Parameter names and
config keys are HF's, so a saved folder loads in `transformers` unchanged and
gives the same logits. Attention goes through `scaled_dot_product_attention`,
except bf16 training on a CPU, where an explicit softmax attention is faster.
Decoding with a KV cache multiplies by transposed, stacked copies of the weights
(`LlamaForCausalLM.inference_weights`), which small-batch matmuls run much faster.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from zhlm.config import model_shape_errors
from zhlm.io import TOKENIZER_FILES, atomic_path, write_bytes, write_json


@dataclass
class ModelConfig:
    vocab_size: int = 8000
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int = 6
    max_position_embeddings: int = 256
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
        if errors := model_shape_errors(asdict(self)):
            raise ValueError("; ".join(errors))

    def to_hf(self) -> dict:
        """The config.json of an equivalent `LlamaForCausalLM`."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", **asdict(self),
            "head_dim": self.head_dim, "hidden_act": "silu", "attention_bias": False,
            "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
            "rope_scaling": None, "torch_dtype": "float32", "use_cache": True,
        }

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
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
        self.shape, self.eps = (dim,), eps

    def forward(self, x):
        # HF normalises in float32, casts back to the input dtype, then multiplies by the weight.
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.shape, eps=self.eps).to(x.dtype)


def rope_tables(config: ModelConfig, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the positions below `length` (max_position_embeddings): (length, 1, head_dim) each.

    HF's rotate-half layout. The sign of rotate_half is folded into sin (its first
    half is negated), so applying the rotation needs no negation.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(length or config.max_position_embeddings).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[:, :dim // 2] *= -1
    return emb.cos()[:, None], sin[:, None]


def apply_rope(x, cos, sin):
    """x: (B, T, heads, head_dim); cos/sin: rows of rope_tables in x's dtype,
    (T, 1, head_dim) or, per-row positions, (B, T, 1, head_dim)."""
    # HF's x * cos + rotate_half(x) * sin: rotate_half(x) is [-x2, x1], the halves
    # swapped (a roll by half) with the sign already in sin.
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class KVCache:
    """Preallocated keys and values, per layer (B, kv_heads, max_len, head_dim)."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))
        self.length = 0

    def update(self, layer: int, k, v):
        """Store the new keys and values (B, kv_heads, T, head_dim); return all of them so far."""
        end = self.length + k.shape[2]
        keys, values = self.layers[layer]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]


def use_explicit_attention(q) -> bool:
    """Training in bf16 on a CPU, up to 512 tokens: there the explicit attention below
    (fwd + bwd) takes about half the time of SDPA's flash kernel, whose backward is slow."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[2] <= 512 and torch.is_grad_enabled()


def explicit_causal_attention(q, k, v):
    """softmax(q k^T / sqrt(d) + causal mask) v, spelled out (scores in q's dtype, as HF's eager attention)."""
    T, groups = q.shape[2], q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    causal = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) + causal
    return torch.softmax(scores, dim=-1) @ v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.heads, self.kv_heads, self.head_dim = H, K, hd = (config.num_attention_heads,
                                                               config.num_key_value_heads, config.head_dim)
        self.q_proj = nn.Linear(h, H * hd, bias=False)
        self.k_proj = nn.Linear(h, K * hd, bias=False)
        self.v_proj = nn.Linear(h, K * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, h, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, stacked=None):
        """x: (B, T, hidden) -> (B, T, hidden).

        `stacked`: the (q|k|v, o) weights from LlamaForCausalLM.inference_weights, or None.
        """
        B, T, _ = x.shape
        H, K, hd = self.heads, self.kv_heads, self.head_dim
        if stacked is None:
            q, k, v = (proj(x).view(B, T, -1, hd) for proj in (self.q_proj, self.k_proj, self.v_proj))
        else:  # one matmul for q, k and v: (B, T, hidden) @ (hidden, (H + 2K)·hd)
            q, k, v = (x @ stacked[0]).view(B, T, H + 2 * K, hd).split((H, K, K), dim=2)
        # (B, T, heads, hd) -> (B, heads, T, hd): attention runs per head over T.
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:  # k, v become (B, K, cached + T, hd)
            k, v = cache.update(layer, k, v)
        if mask is None and cache is None and T > 1 and use_explicit_attention(q):
            y = explicit_causal_attention(q, k, v)
        else:
            # Without a mask: causal over the sequence, or a single new token that sees the whole cache.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=H != K)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # heads side by side again
        return self.o_proj(y) if stacked is None else y @ stacked[1]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, stacked=None):
        """`stacked`: the (gate|up, down) weights from LlamaForCausalLM.inference_weights, or None."""
        if stacked is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = (x @ stacked[0]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ stacked[1]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer, stacked=None):
        attn, mlp = (None, None) if stacked is None else (stacked[:2], stacked[2:])
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, attn)
        return x + self.mlp(self.post_attention_layernorm(x), mlp)


class LlamaModel(nn.Module):
    """The decoder stack without its head: embeddings, layers, final norm (transformers' `LlamaModel`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The decoder stack (`model`) and the language-model head (`lm_head`), as in transformers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    @torch.no_grad()
    def zero_init_out_proj(self):
        """Zero the projections that write into the residual stream (o_proj, down_proj): each
        layer then starts as the identity and the stream carries the embeddings unchanged
        (nanochat's init); their gradients are not zero, so they learn from the first step."""
        for layer in self.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()

    def forward(self, input_ids, *, positions=None, mask=None, cache: KVCache | None = None,
                last_only: bool = False):
        """Logits for `input_ids` (B, T).

        Without `mask`, attention is causal over the sequence (plus the cache).
        `mask` (B, 1, T, T_total; bool with True = attend, or a float bias added to
        the scores) and `positions` (B, T) serve left-padded batches during generation.
        With a `cache`, the matmuls use `inference_weights()`.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
            if start + T > len(self.rope_cos):  # past the context window (HF computes these too)
                cos, sin = (t[start:].to(self.rope_cos) for t in rope_tables(self.config, start + T))
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        device = input_ids.device.type
        if torch.is_autocast_enabled(device):  # q and k come out of the projections in autocast's dtype
            cos, sin = cos.to(torch.get_autocast_dtype(device)), sin.to(torch.get_autocast_dtype(device))
        if mask is None and start > 0 and T > 1:
            # Causal within the new tokens, full view of the cache.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=input_ids.device).tril(start)
        stacked = self.inference_weights() if cache is not None else None
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i, None if stacked is None else stacked[i])
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)
        if last_only:  # decoding needs only the next token's logits: (B, 1, V), not (B, T, V)
            x = x[:, -1:]
        return self.lm_head(x) if stacked is None else x @ stacked[-1]

    def inference_weights(self) -> list | None:
        """The matmul weights transposed and contiguous, for decoding (a KV cache, no autograd).

        Per layer (q|k|v, o, gate|up, down), q, k and v stacked into one matmul and
        gate and up into another, then the lm_head's. Matmuls of a few rows run up to
        3x faster with the weight laid out this way. The copies are kept and remade
        when a parameter changes: optimizer steps, load_state_dict and .to() all show
        in the parameters' versions and storage (writes through `.data` do not, so
        don't). None while autograd needs the parameters themselves.
        """
        params = self.__dict__.get("_matmul_params")
        if params is None:
            params = [p for layer in self.model.layers for p in layer.parameters() if p.dim() == 2]
            self._matmul_params = params = params + [self.lm_head.weight]
        if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or params[0].is_inference():
            return None  # (inference tensors keep no version to check the copies against)
        key = [(p.data_ptr(), p._version) for p in params]
        if self.__dict__.get("_inference_key") != key:
            with torch.no_grad():
                def t(*weights):
                    return torch.cat(weights).t().contiguous()
                stacked = []
                for layer in self.model.layers:
                    a, m = layer.self_attn, layer.mlp
                    stacked.append((t(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight), t(a.o_proj.weight),
                                   t(m.gate_proj.weight, m.up_proj.weight), t(m.down_proj.weight)))
                self._inference_weights = stacked + [t(self.lm_head.weight)]
            self._inference_key = key
        return self._inference_weights

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 × matmul parameters + attention (the PaLM estimate)."""
        c = self.config
        norms = c.hidden_size * (2 * c.num_hidden_layers + 1)
        # With untied embeddings the input embedding is a lookup, not a matmul.
        lookup = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
        matmul_params = c.num_parameters() - norms - lookup
        return 6 * matmul_params + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def save_model(model: LlamaForCausalLM, out_dir: str | os.PathLike) -> None:
    """config.json + model.safetensors, each written atomically.

    The weights are serialised in memory and written by zhlm.io: safetensors' own save_file
    writes through a temporary file of its own (mode 0600, a random name a kill leaves behind)
    and hides a full disk in a SafetensorError.
    """
    from safetensors.torch import save

    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # Weights first: if they cannot be written, the folder keeps its previous config and weights together.
    write_bytes(out_dir / "model.safetensors", save(state, metadata={"format": "pt"}))
    write_json(model.config.to_hf(), out_dir / "config.json")


def load_model(model_dir: str | os.PathLike, device="cpu") -> LlamaForCausalLM:
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    model = LlamaForCausalLM(config)
    state = load_file(str(model_dir / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"{model_dir}: missing weights {missing}, unexpected {unexpected}")
    return model.to(device)




def save_pretrained(model: LlamaForCausalLM, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
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
