"""`zhlm export gguf`: the file read back with gguf's reader, and the same model run in llama.cpp.

The llama.cpp tests need llama-cpp-python (pip install llama-cpp-python, which compiles llama.cpp
for minutes) and are skipped, saying so, where it is not installed.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from zhlm.cli import main
from zhlm.export import DTYPES, export_for_ollama, export_gguf, llama_cpp_greedy, modelfile, rope_pairs_interleaved
from zhlm.generate import Sampling, generate
from zhlm.inference import load
from zhlm.tokenizer.bpe import build_from_counts, save_tokenizer
from zhlm.tokenizer.chat import encode_prompt

try:
    import llama_cpp
except ImportError:
    llama_cpp = None

needs_llama_cpp = pytest.mark.skipif(
    llama_cpp is None, reason="llama-cpp-python is not installed (`pip install llama-cpp-python` compiles llama.cpp, "
                              "several minutes, so CI leaves it out): the parity with llama.cpp is not checked here")

LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """dtype -> the tiny model exported as GGUF in that dtype."""
    out = tmp_path_factory.mktemp("gguf")
    for dtype in DTYPES:
        export_gguf(model_dir, out / f"{dtype}.gguf", dtype)
    return {dtype: out / f"{dtype}.gguf" for dtype in DTYPES}


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def hf_rope(x, pos, base=10000.0):
    """HF's rotate-half RoPE on x (..., d): dimension i turns with i + d/2."""
    d = x.shape[-1]
    angle = pos * base ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(np.concatenate([angle, angle])), np.sin(np.concatenate([angle, angle]))
    return x * cos + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def interleaved_rope(x, pos, base=10000.0):
    """llama.cpp's RoPE for the llama architecture: dimensions 2i and 2i+1 turn together."""
    d = x.shape[-1]
    angle = pos * base ** (-np.arange(0, d, 2) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


def test_permuted_q_and_k_give_the_attention_scores_of_hf_rope():
    rng = np.random.default_rng(0)
    heads, d, hidden = 2, 8, 16
    wq, wk = rng.normal(size=(heads * d, hidden)), rng.normal(size=(heads * d, hidden))
    x_q, x_k = rng.normal(size=hidden), rng.normal(size=hidden)

    def scores(q_weight, k_weight, rope):
        q = rope((q_weight @ x_q).reshape(heads, d), pos=5)
        k = rope((k_weight @ x_k).reshape(heads, d), pos=2)
        return (q * k).sum(-1)  # one score per head

    hf = scores(wq, wk, hf_rope)
    assert np.allclose(scores(rope_pairs_interleaved(wq, heads), rope_pairs_interleaved(wk, heads), interleaved_rope),
                       hf)
    assert not np.allclose(scores(wq, wk, interleaved_rope), hf)  # unpermuted, llama.cpp's RoPE scores differently


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_gguf_holds_the_llama_tensors_under_llama_cpp_names(exported, model_dir, dtype):
    config = json.loads((model_dir / "config.json").read_text())
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    reader = GGUFReader(exported[dtype])
    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{n}.{name}.weight" for n in range(config["num_hidden_layers"]) for name in LAYER_TENSORS}
    assert set(tensors) == expected  # tied embeddings: no output.weight, llama.cpp reuses token_embd
    # ggml lists dimensions innermost first: (in, out) for HF's (out, in).
    shapes = {"token_embd": [h, v], "attn_q": [h, h], "attn_k": [h, kv], "attn_v": [h, kv], "attn_output": [h, h],
              "ffn_gate": [h, i], "ffn_up": [h, i], "ffn_down": [i, h], "attn_norm": [h], "ffn_norm": [h],
              "output_norm": [h]}
    matrix_type = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[dtype]
    for name, t in tensors.items():
        assert list(t.shape) == shapes[name.split(".")[-2]], name
        assert t.tensor_type == (Q.F32 if len(t.shape) == 1 else matrix_type), name


def test_the_weights_read_back_as_the_model_has_them(exported, model_dir):
    weights = load_file(str(model_dir / "model.safetensors"))
    heads = json.loads((model_dir / "config.json").read_text())["num_attention_heads"]
    tolerance = {"f32": 0, "f16": 1e-3, "q8_0": 2e-2}  # relative to the largest weight of the tensor
    for dtype, path in exported.items():
        tensors = {t.name: t for t in GGUFReader(path).tensors}

        def read(name, tensors=tensors):
            t = tensors[name]  # ggml's (in, out) back to HF's (out, in)
            return dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))

        pairs = [("token_embd.weight", weights["model.embed_tokens.weight"]),
                 ("blk.1.ffn_down.weight", weights["model.layers.1.mlp.down_proj.weight"]),
                 ("blk.0.attn_q.weight", rope_pairs_interleaved(weights["model.layers.0.self_attn.q_proj.weight"],
                                                                heads)),
                 ("output_norm.weight", weights["model.norm.weight"])]
        for name, expected in pairs:
            error = np.abs(read(name) - expected).max() / np.abs(expected).max()
            assert error <= tolerance[dtype if expected.ndim == 2 else "f32"], (dtype, name, error)
        q = weights["model.layers.0.self_attn.q_proj.weight"]
        assert np.abs(read("blk.0.attn_q.weight") - q).max() > 10 * tolerance[dtype] * np.abs(q).max()


def test_q8_0_writes_rows_that_do_not_split_into_blocks_of_32_in_f16(model_dir, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("_ckpt"))
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    h, i = config["hidden_size"], config["intermediate_size"] + 8  # 136: not a multiple of 32
    rng = np.random.default_rng(0)
    for n in range(config["num_hidden_layers"]):
        for name, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            weights[f"model.layers.{n}.mlp.{name}.weight"] = rng.normal(size=shape).astype(np.float32)
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": i}))
    summary = export_gguf(folder, tmp_path / "odd.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "odd.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == Q.F16 and types["blk.0.ffn_up.weight"] == Q.Q8_0
    assert summary["tensors"]["F16"] == config["num_hidden_layers"]


def test_untied_embeddings_export_the_output_matrix(model_dir, tmp_path):
    folder = tmp_path / "untied"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("_ckpt"))
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    head = np.random.default_rng(0).normal(size=weights["model.embed_tokens.weight"].shape).astype(np.float32)
    save_file({**weights, "lm_head.weight": head}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    export_gguf(folder, tmp_path / "untied.gguf", "f32")
    tensors = {t.name: t for t in GGUFReader(tmp_path / "untied.gguf").tensors}
    assert np.array_equal(tensors["output.weight"].data, head)


def test_hyper_parameters_and_tokenizer_are_the_folders(exported, model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    reader = GGUFReader(exported["q8_0"])
    assert field(reader, "general.architecture") == "llama"
    assert {key: field(reader, f"llama.{key}") for key in (
        "vocab_size", "context_length", "embedding_length", "block_count", "feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "rope.dimension_count")} == {
        "vocab_size": config["vocab_size"], "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"], "block_count": config["num_hidden_layers"],
        "feed_forward_length": config["intermediate_size"], "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config["num_key_value_heads"],
        "rope.dimension_count": config["hidden_size"] // config["num_attention_heads"]}
    assert field(reader, "llama.rope.freq_base") == config["rope_theta"]
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"]
    assert {t: i for i, t in enumerate(tokens)} == tok["model"]["vocab"]  # every token at its id
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in tok["model"]["merges"]]
    types = field(reader, "tokenizer.ggml.token_type")
    special = {a["id"] for a in tok["added_tokens"]}
    assert {i for i, t in enumerate(types) if t == TokenType.CONTROL} == special == {0, 1, 2}
    assert all(t == TokenType.NORMAL for i, t in enumerate(types) if i not in special)
    ids = {t: i for i, t in enumerate(tokens)}
    assert field(reader, "tokenizer.ggml.bos_token_id") == ids[tok_config["bos_token"]]
    assert field(reader, "tokenizer.ggml.eos_token_id") == ids[tok_config["eos_token"]]
    assert field(reader, "tokenizer.ggml.padding_token_id") == ids[tok_config["pad_token"]]
    assert field(reader, "tokenizer.ggml.eot_token_id") == ids["<|im_end|>"]
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == tok_config["chat_template"]


def test_a_tokenizer_split_another_way_is_refused(model_dir, tmp_path):
    folder = tmp_path / "other_split"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("_ckpt"))
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+|."
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="Qwen2's split pattern"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_the_modelfile_runs_chatml_with_the_folders_context_and_stops(model_dir, tmp_path):
    text = modelfile(model_dir)
    assert text.startswith("FROM ./model.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert "PARAMETER num_ctx 128\n" in text and "PARAMETER temperature 0\n" in text
    # The template, its Go actions filled in for one message, is ChatML as zhlm renders it.
    message = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    body, tail = message.removeprefix("{{- range .Messages }}").split("{{ end }}")
    rendered = body.replace("{{ .Role }}", "user").replace("{{ .Content }}", "你好") + tail
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tokenizer.encode(rendered).ids == encode_prompt(tokenizer, [{"role": "user", "content": "你好"}])


def test_the_command_writes_the_gguf_and_the_modelfile(model_dir, tmp_path, capsys):
    assert main(["export", "gguf", str(model_dir), str(tmp_path / "m.gguf"), "--dtype", "q8_0", "--modelfile"]) == 0
    assert f"{tmp_path / 'm.gguf'}: " in capsys.readouterr().out
    assert GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./m.gguf\n")
    with pytest.raises(SystemExit):
        main(["export", "gguf", str(model_dir), str(tmp_path / "x.gguf"), "--dtype", "q4_0"])


def test_export_for_ollama_names_the_gguf_it_wrote(model_dir, tmp_path):
    export_for_ollama(model_dir, tmp_path / "zh.gguf", "f16")
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./zh.gguf\n")


# --- the same model in llama.cpp -----------------------------------------------------------

TEXTS = ["这个手机很好用，物流也很快！", "Hello, world! It's 2024; we're testing GPT-4o.", "好评👍👍 五星 🌟🚀",
         "价格 ¥1999，性价比高。\n\n  两个空格  and  spaces\t制表符", "<|im_start|>user\n你好<|im_end|>\n",
         "「引号」《书名》……——", "emoji 👨‍👩‍👧 family 😶‍🌫️ ok", "12345 67.89 3..3", "", " ", "\n\n\n",
         "ÀÉÎõü naïve café", "中文English混合mixed文本text，标点。"]


def llama(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_threads=1, verbose=False, **kwargs)


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_zhlm_does(exported, model_dir):
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    llm = llama(exported["f16"], vocab_only=True)
    for text in TEXTS:
        ours = tokenizer.encode(text, add_special_tokens=False).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours, text
        assert llm.detokenize(ours, special=True).decode() == text


@needs_llama_cpp
def test_llama_cpp_splits_text_as_zhlm_does_before_merging(model_dir, tmp_path):
    """A tokenizer whose merges reach across the pieces other split patterns make (zhlm's own seldom
    do: their merges stay inside jieba's words), so that llama.cpp's pre-tokenizer must be Qwen2's."""
    words = {"，好评如潮": 40, " hello": 40, "。\n\n": 40, "   spaces": 40, "I'LL": 40, "x123": 40, "¥1999": 40}
    tokenizer, _ = build_from_counts(words, vocab_size=300)
    folder = tmp_path / "other_tokenizer"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("_ckpt"))
    save_tokenizer(tokenizer, folder)
    export_gguf(folder, tmp_path / "m.gguf", "f16")
    llm = llama(tmp_path / "m.gguf", vocab_only=True)
    for text in ["好评如潮，好评如潮。\n\n", "say hello   spaces I'LL", "x123 ¥1999 x1234"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text).ids, text


def prompts(model_dir) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    chats = [[{"role": "user", "content": "这个手机怎么样？"}],
             [{"role": "system", "content": "你是客服。"}, {"role": "user", "content": "物流很快，包装完好。"}]]
    return [encode_prompt(tokenizer, c) for c in chats] + [tokenizer.encode(t).ids for t in ("质量", "不错，")]


def kv_cache(dtype: str) -> dict:
    """llama.cpp's KV cache in f32 for the f32 file: its default f16 cache rounds the keys and
    values (logits off by ~0.5% on the tiny model), enough to turn a near tie the other way."""
    f32 = llama_cpp.GGML_TYPE_F32
    return {"type_k": f32, "type_v": f32} if dtype == "f32" else {}


@needs_llama_cpp
@pytest.mark.parametrize("dtype, n", [("f32", 48), ("f16", 32)])
def test_llama_cpp_continues_greedily_as_zhlm_does(exported, model_dir, one_torch_thread, dtype, n):
    lm = load(model_dir, "cpu")
    llm = llama(exported[dtype], n_ctx=lm.context, **kv_cache(dtype))
    for prompt in prompts(model_dir):
        ours = generate(lm.model, [prompt], Sampling(max_new_tokens=n))[0]
        assert len(ours) == n
        assert llama_cpp_greedy(llm, prompt, n) == ours


@needs_llama_cpp
def test_llama_cpp_logits_are_zhlms(exported, model_dir):
    lm = load(model_dir, "cpu")
    prompt = prompts(model_dir)[1]
    llm = llama(exported["f32"], n_ctx=lm.context, logits_all=True, **kv_cache("f32"))
    llm.eval(prompt)
    with torch.no_grad():
        ours = lm.model(torch.tensor([prompt]))[0].numpy()
    assert np.abs(llm.scores[:len(prompt)] - ours).max() < 1e-4 * np.abs(ours).max()
