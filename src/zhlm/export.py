"""Export a model folder to GGUF, the single file that llama.cpp, ollama and LM Studio run.

The model is written as llama.cpp's `llama` architecture: the same tensors under llama.cpp's
names, with two conversions. The rows of q_proj and k_proj are permuted (RoPE's pairs, see
`rope_pairs_interleaved`), and a tied lm_head is left out (llama.cpp then reads the token
embeddings for the output, as for any tied Llama). The tokenizer goes in as GPT-2-style
byte-level BPE: its tokens by id, its merges by rank, the special tokens, the ChatML template,
and `qwen2` as the pre-tokenizer, the name under which llama.cpp splits text with the same
regex as zhlm (zhlm.tokenizer.bpe.SPLIT_PATTERN is Qwen2's).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zhlm.io import atomic_path
from zhlm.tokenizer.bpe import SPLIT_PATTERN
from zhlm.tokenizer.chat import IM_END, IM_START

DTYPES = ("f32", "f16", "q8_0")
# llama.cpp's pre-tokenizer whose split regex is zhlm's (Qwen2's).
PRE_TOKENIZER = "qwen2"


@dataclass
class ExportConfig:
    """The export rule's settings (the `export` section of the workflow's config)."""
    dtype: str = "f16"  # f32, f16 or q8_0: the type of the matrices; norms stay f32


def rope_pairs_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """q_proj or k_proj's rows (heads · head_dim, hidden) reordered for llama.cpp's Llama RoPE.

    HF's Llama rotates dimension i of a head with dimension i + head_dim/2 (rotate-half);
    llama.cpp's `llama` architecture rotates neighbours 2i and 2i+1. Within each head, output
    rows [0, d/2, 1, d/2+1, ...] become rows [0, 1, 2, 3, ...], so each rotated pair sits side by
    side. q and k get the same reordering, so their dot products, the attention scores, do not
    change (convert_hf_to_gguf.py's `permute` does the same).
    """
    rows = weight.shape[0]
    half = rows // heads // 2
    # (heads, 2 halves, half, hidden) -> (heads, half, 2, hidden): the halves interleaved.
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_names(layers: int) -> dict[str, str]:
    """HF parameter name -> llama.cpp tensor name (lm_head.weight only matters when untied)."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(layers):
        for hf, ours in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{ours}.weight"
    return names


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """The folder's model.safetensors as float32 numpy arrays (bf16 has no numpy type, so via torch)."""
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def llama_tensors(weights: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """llama.cpp name -> array, in HF's (out, in) layout, which GGUF stores as ggml's (in, out)."""
    names = tensor_names(config["num_hidden_layers"])
    if config.get("tie_word_embeddings", True):
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"weights llama.cpp's Llama has no place for: {unknown}")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out = {}
    for hf, w in weights.items():
        if hf.endswith("q_proj.weight"):
            w = rope_pairs_interleaved(w, heads)
        elif hf.endswith("k_proj.weight"):
            w = rope_pairs_interleaved(w, kv_heads)
        out[names[hf]] = w
    return out


def encode_tensor(array: np.ndarray, dtype: str):
    """(data, GGML type) of one tensor: vectors (the norms) stay f32, matrices take `dtype`.

    Q8_0 quantizes blocks of 32 along a row; a matrix whose rows do not split into such blocks
    (an intermediate size of 688, say) is written in f16 instead, as llama.cpp's converter does.
    """
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if array.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), Q.F32
    if dtype == "q8_0" and array.shape[-1] % 32 == 0:
        return quantize(array, Q.Q8_0), Q.Q8_0
    return array.astype(np.float16), Q.F16


def read_tokenizer(model_dir: Path) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json; refuses a tokenizer llama.cpp would split differently."""
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    pre = tok.get("pre_tokenizer") or {}
    splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    if tok["model"]["type"] != "BPE" or len(splits) != 1 or splits[0]["pattern"].get("Regex") != SPLIT_PATTERN:
        raise ValueError(f"{model_dir}/tokenizer.json is not zhlm's byte-level BPE with Qwen2's split pattern, "
                         f"which the GGUF declares ({PRE_TOKENIZER!r})")
    return tok, tok_config


def vocabulary(tok: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their GGUF token types, merges as "a b" by rank).

    Special tokens are CONTROL (llama.cpp matches them in text only when asked to parse
    specials, as zhlm's tokenizer always does), the rest NORMAL; ids the model has beyond the
    tokenizer's (a vocab rounded up) are UNUSED placeholders.
    """
    from gguf import TokenType

    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    by_id |= {a["id"]: a["content"] for a in tok["added_tokens"]}
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(by_id)}, the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if i in special else TokenType.NORMAL)
    # tokenizers writes a merge as a pair ["a", "b"] (0.20 on) or as the string "a b" (before).
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return tokens, [int(t) for t in types], merges


def token_id(tokens: list[str], text: str | None) -> int | None:
    return tokens.index(text) if text in tokens else None


def export_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f16") -> dict:
    """Write `model_dir` (config.json, model.safetensors, the tokenizer files) as one GGUF file.

    Returns what was written: dtype, tensors by GGML type, size in bytes.
    """
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama" or config.get("rope_scaling"):
        raise ValueError(f"{model_dir}: only plain Llama folders (no rope_scaling) are exported")
    tok, tok_config = read_tokenizer(model_dir)
    vocab_size = config["vocab_size"]
    tokens, types, merges = vocabulary(tok, vocab_size)
    tensors = llama_tensors(load_weights(model_dir), config)

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    counts: dict[str, int] = {}
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(model_dir.resolve().name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        # Hyper-parameters under llama.*
        heads = config["num_attention_heads"]
        writer.add_vocab_size(vocab_size)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(config["num_key_value_heads"])
        writer.add_rope_dimension_count(config["hidden_size"] // heads)  # RoPE turns all of each head
        writer.add_rope_freq_base(float(config["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        # The tokenizer.
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZER)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for add, key in ((writer.add_bos_token_id, "bos_token"), (writer.add_eos_token_id, "eos_token"),
                         (writer.add_pad_token_id, "pad_token")):
            if (i := token_id(tokens, tok_config.get(key))) is not None:
                add(i)
        if (i := token_id(tokens, IM_END)) is not None:  # the end of an assistant turn
            writer.add_eot_token_id(i)
        writer.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))
        writer.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))
        if template := tok_config.get("chat_template"):
            writer.add_chat_template(template)
        for name, array in tensors.items():
            data, qtype = encode_tensor(array, dtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"dtype": dtype, "tensors": counts, "bytes": Path(out_path).stat().st_size}


# ollama's Go template for ChatML, rendering what zhlm.tokenizer.chat.render does:
# <|im_start|>{role}\n{content}<|im_end|>\n per message, then the assistant's turn opened.
OLLAMA_TEMPLATE = (
    "{{- range .Messages }}" + IM_START + "{{ .Role }}\n{{ .Content }}" + IM_END + "\n{{ end }}"
    + IM_START + "assistant\n"
)


def modelfile(model_dir: str | os.PathLike, gguf_name: str = "model.gguf") -> str:
    """An ollama Modelfile for the GGUF file beside it: ChatML, its stop tokens, the folder's
    context and decoding defaults (greedy unless generation_config.json samples)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    stops = list(dict.fromkeys(t for t in (IM_END, tok_config.get("eos_token")) if t))
    temperature = float(gen.get("temperature", 1.0)) if gen.get("do_sample") else 0.0
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
             *(f'PARAMETER stop "{s}"' for s in stops),
             f"PARAMETER num_ctx {config['max_position_embeddings']}",  # RoPE was trained this far only
             f"PARAMETER temperature {temperature:g}",
             f"PARAMETER top_p {float(gen.get('top_p', 1.0)):g}",
             f"PARAMETER repeat_penalty {float(gen.get('repetition_penalty', 1.0)):g}"]
    return "\n".join(lines) + "\n"


def export_for_ollama(model_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f16") -> dict:
    """The GGUF file and a `Modelfile` beside it (`ollama create NAME -f Modelfile`)."""
    out_path = Path(out_path)
    summary = export_gguf(model_dir, out_path, dtype)
    with atomic_path(out_path.parent / "Modelfile") as tmp:
        tmp.write_text(modelfile(model_dir, out_path.name), encoding="utf-8")
    return summary


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """n tokens of a `llama_cpp.Llama`'s greedy continuation of `prompt`, not stopping at
    end-of-turn tokens: what the parity checks compare with zhlm's own greedy generation."""
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == n:
            return out
