import pytest
import torch
from transformers import AutoModelForCausalLM

from zhlm.generate import Sampling, generate, next_tokens
from zhlm.model import KVCache, LlamaForCausalLM, ModelConfig, load_model, save_model


def tiny(tie=True, kv_heads=2, std=0.02):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                         max_position_embeddings=64, initializer_range=std)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie,kv_heads", [(True, 2), (False, 4)])
def test_transformers_loads_the_folder_and_gives_the_same_logits(tmp_path, tie, kv_heads):
    model = tiny(tie, kv_heads)
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()
    save_model(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=1e-4)
        assert torch.equal(load_model(tmp_path)(ids), model(ids))


def test_kv_cache_gives_the_logits_of_a_full_pass():
    model = tiny()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
        parts = [model(ids[:, :7], cache=cache), model(ids[:, 7:8], cache=cache), model(ids[:, 8:], cache=cache)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_batched_generation_matches_one_prompt_at_a_time_and_a_naive_loop(tmp_path):
    model = tiny(tie=False, std=0.5)  # a large init gives varied greedy continuations
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    sampling = Sampling(max_new_tokens=10)
    batched = generate(model, prompts, sampling)
    assert batched == [generate(model, [p], sampling)[0] for p in prompts]
    for prompt, new in zip(prompts, batched):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
        assert ids[len(prompt):] == new
    assert len({tuple(b) for b in batched}) > 1
    save_model(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    out = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out[0, len(prompts[0]):].tolist() == batched[0]


def test_generation_stops_at_a_stop_token_and_sampling_is_seeded():
    model = tiny(tie=False, std=0.5)
    greedy = generate(model, [[1, 2, 3]], Sampling(max_new_tokens=10))[0]
    stop = greedy[3]
    assert generate(model, [[1, 2, 3]], Sampling(max_new_tokens=10), stop_ids=(stop,))[0] == greedy[:greedy.index(stop)]
    sampling = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9)
    runs = [generate(model, [[1, 2, 3]] * 2, sampling, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_prompt_longer_than_the_context_fails_clearly():
    model = tiny()
    with pytest.raises(ValueError, match="no room"):
        generate(model, [list(range(64))], Sampling(max_new_tokens=4))


def test_repetition_penalty_ignores_left_padding():
    model = tiny(tie=False, std=0.5)
    sampling = Sampling(max_new_tokens=8, repetition_penalty=1.3)
    prompts = [[0, 5, 0, 7], [9, 8, 7, 6, 5, 4, 3]]  # token 0 is also the padding id
    assert generate(model, prompts, sampling) == [generate(model, [p], sampling)[0] for p in prompts]
    logits = torch.tensor([[3.0, 2.5, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert next_tokens(logits, sampling, None, seen).item() == 1  # 3.0 / 1.3 < 2.5
    assert next_tokens(logits, Sampling(), None, seen).item() == 0
