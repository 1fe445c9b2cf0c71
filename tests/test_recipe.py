"""The training recipe's options: the Muon/AdamW split, zero-initialised output projections, the
schedule applied to every optimizer, and pretraining text mixed into SFT."""
import numpy as np
import pytest
import torch

from zhlm.model import LlamaForCausalLM, ModelConfig
from zhlm.tokenizer.chat import IGNORE
from zhlm.train.batches import Concatenated, TextWindows
from zhlm.train.loop import TrainConfig, lr_factor, make_optimizer, optimizer_step
from zhlm.train.pretrain import next_token_loss

CONFIG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


class RandomWindows:
    def global_batch(self, step):
        x = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(step))
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    def count(self, batch):
        return batch["labels"].numel()


def test_muon_takes_the_decoder_matrices_and_adamw_the_rest():
    model = LlamaForCausalLM(CONFIG)
    adamw, muon = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu")).optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if n.startswith("model.layers.") and p.dim() == 2}
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    assert "model.embed_tokens.weight" in in_adamw  # tied with lm_head: one parameter, on AdamW
    only_adamw = make_optimizer(model, TrainConfig(), torch.device("cpu")).optimizers
    assert len(only_adamw) == 1 and isinstance(only_adamw[0], torch.optim.AdamW)


def test_the_schedule_scales_each_optimizers_own_peak_rate():
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    cfg = TrainConfig(optimizer="muon", lr=0.003, muon_lr=0.01, steps=10, warmup_steps=4, micro_batch=4,
                      global_batch=4, schedule="wsd")
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    row = optimizer_step(model, model, optimizer, RandomWindows(), next_token_loss, cfg, 1,
                         lambda: torch.autocast("cpu", enabled=False))
    adamw, muon = optimizer.optimizers
    assert row["lr"] == pytest.approx(0.003 * lr_factor(cfg, 1)) == pytest.approx(0.003 * 2 / 4)
    assert all(g["lr"] == pytest.approx(0.003 * 0.5) for g in adamw.param_groups)
    assert all(g["lr"] == pytest.approx(0.01 * 0.5) for g in muon.param_groups)


def test_zero_initialised_output_projections_start_each_layer_as_the_identity_and_then_learn():
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    model.zero_init_out_proj()
    x = torch.randint(0, 50, (2, 8))
    # Every layer adds zero: the logits are the final norm of the embeddings times the head.
    expected = model.lm_head(model.model.norm(model.model.embed_tokens(x)))
    assert torch.allclose(model(x), expected)
    cfg = TrainConfig(optimizer="muon", steps=4, warmup_steps=1, micro_batch=4, global_batch=4)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    optimizer_step(model, model, optimizer, RandomWindows(), next_token_loss, cfg, 0,
                   lambda: torch.autocast("cpu", enabled=False))
    for layer in model.model.layers:
        assert layer.self_attn.o_proj.weight.abs().sum() > 0 and layer.mlp.down_proj.weight.abs().sum() > 0


def test_text_windows_are_fully_labelled_and_concatenated_after_the_conversations():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = TextWindows(tokens, 12, 5, seed=3)
    assert len(windows) == 5
    for i in range(5):
        ids, labels = windows[i]
        assert len(ids) == 12 and np.array_equal(ids, labels) and np.all(np.diff(ids) == 1)
    conversations = [(np.array([1, 2, 3]), np.array([IGNORE, 2, 3])), (np.array([4, 5]), np.array([IGNORE, 5]))]
    both = Concatenated(conversations, windows)
    assert len(both) == 7
    assert both[1] is conversations[1]
    assert np.array_equal(both[2][0], windows[0][0]) and np.array_equal(both[6][0], windows[4][0])
    with pytest.raises(ValueError, match="too few"):
        TextWindows(tokens[:10], 12, 1, seed=0)


def test_dpo_with_sft_weight_adds_the_chosen_answers_mean_token_nll():
    from zhlm.lm import pad_batch, token_nll
    from zhlm.train.dpo import collate_pairs, make_dpo_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    chosen = (np.array([1, 2, 3, 4, 5]), np.array([IGNORE, IGNORE, 3, 4, 5]))
    rejected = (np.array([1, 2, 6, 7]), np.array([IGNORE, IGNORE, 6, 7]))
    batch = collate_pairs([(chosen, rejected, -5.0, -4.0), (rejected, chosen, -4.0, -5.0)], pad_id=0)
    plain, _ = make_dpo_loss(0.1)(model, batch)
    with_nll, metrics = make_dpo_loss(0.1, sft_weight=0.5)(model, batch)
    padded = pad_batch([chosen, rejected], 0)
    nll = token_nll(model(padded["input_ids"]), padded["labels"]).sum(-1) / torch.tensor([3.0, 2.0])  # per token
    assert with_nll.item() == pytest.approx(plain.item() + 0.5 * nll.sum().item(), rel=1e-5)
    assert metrics["chosen_nll"] == pytest.approx(nll.sum().item(), rel=1e-5)


def test_dpo_anchor_weight_adds_each_anchor_conversations_mean_token_nll():
    from zhlm.lm import pad_batch, token_nll
    from zhlm.train.dpo import Pairs, WithAnchors, collate_pairs, make_dpo_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    chosen = (np.array([1, 2, 3, 4, 5]), np.array([IGNORE, IGNORE, 3, 4, 5]))
    rejected = (np.array([1, 2, 6, 7]), np.array([IGNORE, IGNORE, 6, 7]))
    anchors = [(np.array([1, 8, 9]), np.array([IGNORE, 8, 9])),
               (np.array([1, 2, 3, 10]), np.array([IGNORE] * 3 + [10]))]
    pairs = Pairs([chosen, rejected], [rejected, chosen], np.array([[-5.0, -4.0], [-4.0, -5.0]]))
    items = WithAnchors(pairs, anchors, seed=0)
    assert sorted(int(i) for i in items.choice) == [0, 1]  # each anchor once while there are enough
    batch = collate_pairs([items[0], items[1]], pad_id=0)
    plain, _ = make_dpo_loss(0.1)(model, {k: v for k, v in batch.items() if not k.startswith("anchor")})
    anchored, metrics = make_dpo_loss(0.1, anchor_weight=2.0)(model, batch)
    padded = pad_batch([anchors[int(i)] for i in items.choice], 0)
    counts = (padded["labels"] != IGNORE).sum(-1)
    nll = (token_nll(model(padded["input_ids"]), padded["labels"]).sum(-1) / counts).sum()
    assert anchored.item() == pytest.approx(plain.item() + 2.0 * nll.item(), rel=1e-5)
    assert metrics["anchor_nll"] == pytest.approx(nll.item(), rel=1e-5)
    # More pairs than anchors: every anchor is used before any repeats.
    many = WithAnchors(Pairs([chosen] * 5, [rejected] * 5), anchors, seed=0)
    assert sorted(int(i) for i in many.choice[:4]) == [0, 0, 1, 1]


def test_repeated_tokens_marks_each_token_that_completes_an_ngram_seen_before_in_its_answer():
    from zhlm.train.dpo import repeated_tokens

    labels = torch.tensor([[IGNORE, IGNORE, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 5, IGNORE],
                           [IGNORE, 7, 7, 7, 7, 7, 7, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]])
    assert repeated_tokens(labels, 4).nonzero().tolist() == [[0, 9], [0, 10], [0, 11], [1, 5], [1, 6]]
    assert not repeated_tokens(torch.tensor([[IGNORE, 1, 2, 3, 4, 5, 6]]), 4).any()  # no repeat, no mark


def test_dpo_unlikelihood_weight_adds_minus_log_one_minus_p_of_the_rejected_answers_repeated_tokens():
    from zhlm.lm import pad_batch
    from zhlm.train.dpo import Pairs, collate_pairs, make_dpo_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    chosen = (np.array([1, 2, 3, 4, 5]), np.array([IGNORE, IGNORE, 3, 4, 5]))
    looping = np.array([1, 2] + [6, 7, 8, 9] * 3)  # from the 4th token of the second turn on, 4-grams repeat
    rejected = (looping, np.array([IGNORE, IGNORE, *looping[2:]]))
    pairs = Pairs([chosen, chosen], [rejected, chosen], np.array([[-5.0, -4.0], [-4.0, -5.0]]))
    batch = collate_pairs([pairs[0], pairs[1]], pad_id=0, mark_repeats=True)
    plain, _ = make_dpo_loss(0.1)(model, batch)
    penalised, metrics = make_dpo_loss(0.1, unlikelihood_weight=2.0)(model, batch)
    padded = pad_batch([rejected], 0)
    p = torch.softmax(model(padded["input_ids"]).float(), -1)[0].gather(-1, padded["labels"][0].clamp(min=0)[:, None])
    expected = -torch.log1p(-p[-5:]).mean()  # the looping answer's repeated tokens; the second pair has none
    assert batch["rejected_repeats"].sum().item() == 5
    assert penalised.item() == pytest.approx(plain.item() + 2.0 * expected.item(), rel=1e-5)
    assert metrics["repeat_unlikelihood"] == pytest.approx(expected.item(), rel=1e-5)


def test_batches_grouped_by_length_pad_less_and_still_see_every_example_once_per_epoch():
    from zhlm.train.batches import Examples

    lengths = np.random.default_rng(0).integers(5, 200, size=64 * 8 * 3)  # 3 groups of 64 batches of 8
    plain = Examples(list(range(len(lengths))), 8, seed=1, collate=list, count=len)
    grouped = Examples(list(range(len(lengths))), 8, seed=1, collate=list, count=len, lengths=lengths)
    steps = range(64 * 3)
    assert grouped.indices(70) == grouped.indices(70)  # the batch of a step depends on (seed, step) only
    assert sorted(i for s in steps for i in grouped.indices(s)) == list(range(len(lengths)))  # one epoch
    for group in range(3):  # each group holds the same items as the plain order's 64 batches
        window = range(64 * group, 64 * (group + 1))
        assert sorted(i for s in window for i in grouped.indices(s)) == sorted(i for s in window
                                                                               for i in plain.indices(s))
    padded = {name: np.mean([lengths[src.indices(s)].max() for s in steps]) for name, src in
              (("plain", plain), ("grouped", grouped))}
    assert padded["grouped"] < 0.7 * padded["plain"], padded
