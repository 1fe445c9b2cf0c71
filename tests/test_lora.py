"""LoRA for SFT and DPO (zhlm.train.lora, through peft): only the adapters train, the adapter
folder is peft's and the merged folder an ordinary one (both load in transformers with the same
logits), a killed LoRA SFT resumes bit-exactly, DPO's reference is the policy without its
adapter, and a config with `lora` plans the merge_lora jobs."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from test_conversation_tokens import sft_rows, write_rows

from zhlm.io import ADAPTER_FILES, MODEL_FILES, read_json
from zhlm.lm import pad_batch
from zhlm.model import LlamaForCausalLM, ModelConfig, load_model, save_pretrained
from zhlm.tokenizer.conversations import Conversations, tokenize_dpo, tokenize_sft
from zhlm.train import dpo, sft
from zhlm.train.batches import Examples
from zhlm.train.loop import TrainConfig, make_optimizer, read_checkpoint, start, train
from zhlm.train.lora import LoraSettings, add_adapter, load_adapter, merge_folder, peft_config

REPO = Path(__file__).resolve().parents[1]
# A learning rate high enough that the adapters move the logits far more than the 1e-5 compared at.
SETTINGS = {"steps": 6, "global_batch": 4, "micro_batch": 2, "seq_len": 40, "lr": 1e-2, "warmup_steps": 1,
            "eval_every": 3, "checkpoint_every": 2, "eval_examples": 8, "dtype": "fp32", "device": "cpu",
            "lora": {"r": 4, "alpha": 8}}


@pytest.fixture(scope="module")
def base_dir(corpus, model_dir, tmp_path_factory):
    """The tiny model of conftest at the usual init (std 0.02), untrained, as the model LoRA adapts.

    conftest's own (init std 0.5, which the decoding tests need) amplifies float32 rounding to
    about 5e-5 in its logits, so that the adapter applied unmerged and merged differ by more than
    the 1e-5 they are compared at; at std 0.02 they differ by about 4e-7 (measured).
    """
    config = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lora_base")
    save_pretrained(LlamaForCausalLM(dataclasses.replace(config, initializer_range=0.02)), out, corpus / "tokenizer",
                    eos_token_ids=[config.eos_token_id])
    return out


@pytest.fixture(scope="module")
def sft_tokens(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_sft")
    rows = sft_rows()
    tokenize_sft([write_rows(rows, root / "train.parquet")], [write_rows(rows[::5], root / "eval.parquet")],
                 corpus / "tokenizer/tokenizer.json", root / "tokens", batch_size=16)
    return root / "tokens"


@pytest.fixture(scope="module")
def lora_sft(corpus, base_dir, sft_tokens, tmp_path_factory):
    """A LoRA SFT run on the tiny model: its adapter folder, and that merged into the base."""
    root = tmp_path_factory.mktemp("lora_sft_run")
    sft.run(base_dir, corpus / "tokenizer", sft_tokens, root / "adapter", root / "adapter/_ckpt", settings=SETTINGS,
            progress=False)
    merge_folder(base_dir, root / "adapter", corpus / "tokenizer", root / "merged")
    return root / "adapter", root / "merged"


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


def test_lora_training_changes_only_the_adapters(base_dir, sft_tokens, tmp_path):
    """SFT's loop and loss on a model with an adapter: the base weights end byte-identical."""
    cfg, device, _ = start(SETTINGS, [])
    model = load_model(base_dir, device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapter(model, cfg.lora)
    examples, _ = Conversations(sft_tokens, "train").cut(cfg.seq_len + 1)
    pad = model.config.pad_token_id
    data = Examples(examples, cfg.global_batch, cfg.seed, lambda b: pad_batch(b, pad), sft.count_conversations)
    train(model, data, sft.sft_loss, cfg, out_dir=tmp_path, ckpt_dir=tmp_path / "_ckpt", progress=False)
    after = model.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert base.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(base[name], tensor), name
    adapters = {k: v for k, v in after.items() if "lora_" in k}
    assert len(adapters) == 2 * 7 * 2  # A and B of 7 linears in each of 2 layers
    assert all(v.abs().max() > 1e-3 for k, v in adapters.items() if "lora_B" in k)  # each B has left its zero init


def test_the_adapter_folder_is_peft_s(lora_sft):
    adapter_dir, _ = lora_sft
    assert sorted(p.name for p in adapter_dir.iterdir() if p.is_file()) == sorted([*ADAPTER_FILES, "loss.png"])
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"], config["task_type"]) == (4, 8, "LORA", "CAUSAL_LM")
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert len(saved) == 2 * 7 * 2 and all(k.startswith("base_model.model.model.layers.") for k in saved)


def test_only_adapters_require_grad_and_stay_on_adamw_under_muon():
    model = LlamaForCausalLM(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    add_adapter(model, LoraSettings(r=2, target_modules=["q_proj", "down_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.{m}.lora_{f}.default.weight" for i in range(2)
                         for m in ("self_attn.q_proj", "mlp.down_proj") for f in "AB"}
    optimizers = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu")).optimizers
    assert len(optimizers) == 1 and isinstance(optimizers[0], torch.optim.AdamW)  # no Muon: nothing for it
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for g in optimizers[0].param_groups for p in g["params"]} == trainable


def test_the_merged_folder_gives_base_plus_adapter_in_zhlm_transformers_and_peft(corpus, base_dir, lora_sft):
    adapter_dir, merged_dir = lora_sft
    assert sorted(p.name for p in merged_dir.iterdir() if p.is_file()) == sorted([*MODEL_FILES, "loss.png"])
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    base = logits(load_model(base_dir), ids)
    adapted = logits(load_adapter(load_model(base_dir), adapter_dir), ids)
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the model: the checks below can fail
    merged = logits(load_model(merged_dir), ids)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
    torch.testing.assert_close(logits(hf_merged, ids).logits, adapted, atol=1e-5, rtol=0)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    with_adapter = peft.PeftModel.from_pretrained(hf_base, adapter_dir)
    torch.testing.assert_close(logits(with_adapter, ids).logits, adapted, atol=1e-5, rtol=0)
    # The merged folder is a chat stage's: it stops at <|im_end|> as SFT's own folder does.
    generation = json.loads((merged_dir / "generation_config.json").read_text())
    assert len(generation["eos_token_id"]) == 2


RESUMED = {**SETTINGS, "steps": 12}


def sft_cmd(corpus, base_dir, tokens, out):
    return [sys.executable, str(REPO / "workflow/scripts/sft.py"), "--init", str(base_dir),
            "--tokenizer", str(corpus / "tokenizer"), "--tokens", str(tokens), "--pretrain-tokens",
            str(corpus / "tokens"), "--out", str(out), "--ckpt", str(out / "_ckpt"),
            "--settings", json.dumps(RESUMED)]


def test_lora_sft_resumes_after_sigkill_to_the_adapter_of_an_uninterrupted_run(corpus, base_dir, sft_tokens,
                                                                               tmp_path):
    from test_train import run_until_checkpoint_then_kill

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    sft.run(base_dir, corpus / "tokenizer", sft_tokens, straight, straight / "_ckpt", settings=RESUMED, progress=False)
    run_until_checkpoint_then_kill(sft_cmd(corpus, base_dir, sft_tokens, resumed), resumed / "_ckpt/last.pt")
    assert not (resumed / "adapter_model.safetensors").exists()
    # The checkpoint holds the base weights as loaded: frozen, byte for byte.
    state = read_checkpoint(resumed / "_ckpt/last.pt")
    assert 0 < state["step"] < 12
    base = load_file(str(base_dir / "model.safetensors"))
    for name, tensor in state["model"].items():
        if "lora_" not in name and name.replace(".base_layer", "") in base:
            assert torch.equal(tensor, base[name.replace(".base_layer", "")]), name
    rerun = subprocess.run(sft_cmd(corpus, base_dir, sft_tokens, resumed), capture_output=True, text=True,
                           check=True)
    assert "resumed from" in rerun.stderr
    a, b = (load_file(str(folder / "adapter_model.safetensors")) for folder in (straight, resumed))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not (resumed / "_ckpt/last.pt").exists()


@pytest.fixture(scope="module")
def dpo_tokens(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_dpo")
    rows = [r for r in sft_rows() if r["response"] is not None]
    rejected = [r["response"] for r in rows[1:] + rows[:1]]  # another row's answer
    pairs = [{**{k: v for k, v in r.items() if k != "response"}, "chosen": r["response"], "rejected": other,
              "split": "eval" if i % 6 == 0 else "train"} for i, (r, other) in enumerate(zip(rows, rejected))]
    tokenize_dpo([write_rows(pairs, root / "pairs.parquet")], [], corpus / "tokenizer/tokenizer.json", root / "tokens",
                 batch_size=16)
    return root / "tokens"


def test_dpo_with_a_lora_policy_gives_the_losses_of_an_explicit_frozen_reference_copy(corpus, base_dir, dpo_tokens,
                                                                                     tmp_path):
    settings = {**SETTINGS, "beta": 0.5, "lr": 3e-2, "eval_every": 2}
    history = dpo.run(base_dir, corpus / "tokenizer", dpo_tokens, tmp_path / "dpo", tmp_path / "dpo/_ckpt",
                      settings=settings, progress=False)
    # The same run by hand, with a second, frozen copy of the SFT model as the reference. The adapter
    # is added where dpo.run adds it in the random stream: after the policy is loaded.
    cfg, device, _ = start(settings, [])
    policy = add_adapter(load_model(base_dir, device), cfg.lora)
    reference = load_model(base_dir, device).eval().requires_grad_(False)
    pad, max_len, dtype = policy.config.pad_token_id, cfg.seq_len + 1, read_json(dpo_tokens / "meta.json")["dtype"]
    items, eval_items = (dpo.with_reference(reference, dpo.open_pairs(dpo_tokens, split, max_len, dtype), pad)
                         for split in ("train", "eval"))
    data = Examples(items, cfg.global_batch, cfg.seed, lambda b: dpo.collate_pairs(b, pad),
                    count=lambda b: len(b["ref_chosen"]))
    expected = train(policy, data, dpo.make_dpo_loss(cfg.beta), cfg, out_dir=tmp_path / "by_hand",
                     ckpt_dir=tmp_path / "by_hand/_ckpt", progress=False,
                     evaluate=lambda m: dpo.reward_metrics(m, eval_items, cfg.beta, pad))
    keys = ("step", "loss", "grad_norm", "reward_accuracy", "val_reward_accuracy", "val_reward_margin")
    assert [{k: row.get(k) for k in keys} for row in history] == [{k: row.get(k) for k in keys} for row in expected]
    # The policy has left the reference: the losses move away from log 2 per pair.
    assert abs(history[-1]["loss"] - np.log(2)) > 1e-3 and any("val_reward_margin" in row for row in history)
    # With the adapter switched off, the trained policy is the reference again (as TRL uses it).
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = policy(ids)
        for layer in policy.modules():
            if isinstance(layer, peft.tuners.tuners_utils.BaseTunerLayer):
                layer.enable_adapters(False)
        assert (trained - reference(ids)).abs().max() > 1e-3
        assert torch.equal(policy(ids), reference(ids))


def test_a_config_with_lora_plans_the_merge_of_each_adapter_into_its_stage_folder(tmp_path):
    config = yaml.safe_load((REPO / "tests/tiny.yaml").read_text())
    config["sft"]["lora"] = {}
    config["dpo"]["lora"] = {"r": 4}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                          "--cores", "1", f"--configfile={tmp_path / 'config.yaml'}", "-n"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = {}
    for block in run.stdout.split("\nrule ")[1:]:
        name, lines = block.split(":", 1)[0], block.splitlines()
        fields = {line.split(": ", 1)[0].strip(): line.split(": ", 1)[1].split(", ") for line in lines[1:3]}
        jobs.setdefault(name, []).append(fields)
    for stage, base in (("sft", "pretrain"), ("dpo", "sft")):
        [trained] = jobs[stage]
        assert sorted(trained["output"]) == sorted(f"results/{stage}/lora/{f}" for f in (*ADAPTER_FILES, "loss.png"))
        [merge] = [job for job in jobs["merge_lora"] if f"results/{stage}/model.safetensors" in job["output"]]
        assert set(trained["output"]) < set(merge["input"]) and f"results/{base}/model.safetensors" in merge["input"]
        assert sorted(merge["output"]) == sorted(f"results/{stage}/{f}" for f in (*MODEL_FILES, "loss.png"))
    # Rollouts and the eval read the merged SFT folder, as without LoRA.
    assert "results/sft/model.safetensors" in jobs["rollouts"][0]["input"]


def test_lora_settings_reach_peft_with_the_schema_s_defaults():
    config = peft_config(TrainConfig(lora={"dropout": 0.05}).lora, "results/sft")
    assert (config.r, config.lora_alpha, config.lora_dropout, config.base_model_name_or_path) == (
        8, 16, 0.05, "results/sft")
    assert config.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
