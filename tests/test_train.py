"""The training loop: resume after SIGKILL, DDP under torchrun, the SFT mask, the DPO loss."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from zhlm.lm import IGNORE, pad_batch, sequence_logp
from zhlm.tokenizer.chat import encode_chat
from zhlm.train import launch
from zhlm.train.dpo import dpo_losses, make_dpo_loss
from zhlm.train.loop import CHECKPOINTS, TrainConfig, autocast_dtype, learning_rate, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}


def pretrain_cmd(corpus, out, launcher=(sys.executable,), **settings):
    settings = {"steps": 12, "global_batch": 8, "micro_batch": 4, "seq_len": 32, "lr": 0.003, "warmup_steps": 2,
                "eval_every": 6, "checkpoint_every": 2, "eval_windows": 2, "dtype": "fp32", **settings}
    return [*launcher, str(REPO / "workflow/scripts/pretrain.py"), "--tokens", str(corpus / "tokens"),
            "--tokenizer", str(corpus / "tokenizer"), "--out", str(out), "--ckpt", str(out / "_ckpt"),
            "--model", json.dumps(MODEL), "--settings", json.dumps(settings)]


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def run_until_checkpoint_then_kill(cmd, ckpt):
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.parametrize("recipe", [{}, {"optimizer": "muon", "zero_init_out_proj": True, "schedule": "wsd"}],
                         ids=["adamw", "muon"])
def test_resume_after_sigkill_gives_the_weights_of_an_uninterrupted_run(corpus, tmp_path, recipe):
    subprocess.run(pretrain_cmd(corpus, tmp_path / "straight", **recipe), check=True, capture_output=True)

    resumed = tmp_path / "resumed"
    run_until_checkpoint_then_kill(pretrain_cmd(corpus, resumed, **recipe), resumed / "_ckpt/last.pt")
    assert not (resumed / "model.safetensors").exists()
    rerun = subprocess.run(pretrain_cmd(corpus, resumed, **recipe), capture_output=True, text=True, check=True)
    assert "resumed from" in rerun.stderr

    a, b = weights(tmp_path / "straight"), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not (resumed / "_ckpt/last.pt").exists(), "the checkpoint is removed once the final files are written"


def test_a_checkpoint_of_other_settings_is_not_resumed(corpus, tmp_path):
    fresh = tmp_path / "fresh"
    subprocess.run(pretrain_cmd(corpus, fresh), check=True, capture_output=True)
    other = tmp_path / "other"
    run_until_checkpoint_then_kill(pretrain_cmd(corpus, other, lr=0.01), other / "_ckpt/last.pt")
    out = tmp_path / "out"
    (out / "_ckpt").mkdir(parents=True)
    (other / "_ckpt/last.pt").rename(out / "_ckpt/last.pt")
    rerun = subprocess.run(pretrain_cmd(corpus, out), capture_output=True, text=True, check=True)
    assert "resumed from" not in rerun.stderr and "other settings" in rerun.stderr
    expected = weights(fresh)
    for name, tensor in weights(out).items():
        assert torch.equal(tensor, expected[name]), name


def test_two_processes_under_torchrun_match_one_process(corpus, tmp_path):
    subprocess.run(pretrain_cmd(corpus, tmp_path / "one", steps=6, micro_batch=4), check=True, capture_output=True)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    run = subprocess.run(pretrain_cmd(corpus, tmp_path / "two", launcher=torchrun, steps=6, micro_batch=2),
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name
    log = (tmp_path / "two/train_log.csv").read_text().splitlines()
    assert len(log) == 7 and log[0].startswith("step,loss")


def test_sft_mask_covers_exactly_the_assistant_tokens(corpus):
    tokenizer = Tokenizer.from_file(str(corpus / "tokenizer/tokenizer.json"))
    messages = [{"role": "system", "content": "你是一个助手。"},
                {"role": "user", "content": "这本书怎么样？"}, {"role": "assistant", "content": "很好，推荐！"},
                {"role": "user", "content": "还有呢？\n"}, {"role": "assistant", "content": " 质量不错 👍"}]
    ids, labels = encode_chat(tokenizer, messages)
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\n你是一个助手。<|im_end|>\n<|im_start|>user\n这本书怎么样？<|im_end|>\n"
        "<|im_start|>assistant\n很好，推荐！<|im_end|>\n<|im_start|>user\n还有呢？\n<|im_end|>\n"
        "<|im_start|>assistant\n 质量不错 👍<|im_end|>\n")
    trained = [label for label in labels if label != IGNORE]
    assert tokenizer.decode(trained, skip_special_tokens=False) == "很好，推荐！<|im_end|> 质量不错 👍<|im_end|>"
    # Labels are the ids themselves where they count, and form two contiguous runs.
    runs = sum(1 for i, label in enumerate(labels) if label != IGNORE and (i == 0 or labels[i - 1] == IGNORE))
    assert runs == 2 and all(label in (IGNORE, token) for label, token in zip(labels, ids))
    batch = pad_batch([(ids, labels), (ids[:5], labels[:5])], pad_id=0)
    assert batch["labels"][0].tolist() == labels[1:]
    assert batch["input_ids"][0].tolist() == ids[:-1]
    assert (batch["labels"][1, 4:] == IGNORE).all()


def test_dpo_loss_matches_a_hand_computed_value():
    losses, margin = dpo_losses(torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0]),
                                torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -2.0]), beta=0.5)
    # pair 1: 0.5 * ((-1 + 2) - (-3 + 2)) = 1.0; pair 2: 0.5 * ((-4 + 3) - (-2 + 2)) = -0.5
    assert margin.tolist() == [1.0, -0.5]
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))])


def test_dpo_loss_of_a_model_uses_the_summed_answer_log_probabilities():
    torch.manual_seed(0)
    from zhlm.model import LlamaForCausalLM, ModelConfig

    model = LlamaForCausalLM(ModelConfig(vocab_size=50, **MODEL))
    ids = torch.randint(3, 50, (2, 9))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    logp = torch.log_softmax(model(ids), -1)
    by_hand = torch.stack([sum(logp[b, t, labels[b, t]] for t in range(4, 9)) for b in range(2)])
    assert torch.allclose(sequence_logp(model, ids, labels), by_hand, atol=1e-5)
    batch = {"chosen_ids": ids, "chosen_labels": labels, "rejected_ids": ids.flip(0), "rejected_labels": labels.flip(0),
             "ref_chosen": torch.zeros(2, dtype=torch.float64), "ref_rejected": torch.zeros(2, dtype=torch.float64)}
    loss, metrics = make_dpo_loss(0.1)(model, batch)
    expected = -torch.nn.functional.logsigmoid(0.1 * (by_hand - by_hand.flip(0))).sum()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert metrics["reward_accuracy"] == 1.0  # one pair of the two has the higher chosen log-prob


def test_learning_rate_schedules():
    cosine = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(cosine, 0) == pytest.approx(0.1)
    assert learning_rate(cosine, 9) == pytest.approx(1.0)
    assert learning_rate(cosine, 55) == pytest.approx(0.55)
    assert learning_rate(cosine, 100) == pytest.approx(0.1)
    wsd = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(wsd, 50) == 1.0 and learning_rate(wsd, 79) == 1.0
    assert learning_rate(wsd, 99) == pytest.approx(0.0)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                        (False, False, None)])
def test_auto_dtype_on_a_cpu_is_bf16_where_it_has_bf16_instructions(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert autocast_dtype(TrainConfig(dtype="auto"), cpu) is expected
    assert autocast_dtype(TrainConfig(dtype="fp32"), cpu) is None
    assert autocast_dtype(TrainConfig(dtype="bf16"), cpu) is torch.bfloat16


def run_until_then_terminate(cmd, path) -> str:
    """Start `cmd`, send it SIGTERM once `path` exists, and return its stderr; it must stop on the signal."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    return stderr


def test_sigterm_checkpoints_and_the_rerun_resumes_from_it(corpus, tmp_path):
    """SLURM preemption: SIGTERM before the kill; the job checkpoints, and a rerun continues."""
    subprocess.run(pretrain_cmd(corpus, tmp_path / "straight"), check=True, capture_output=True)
    out = tmp_path / "preempted"
    stderr = run_until_then_terminate(pretrain_cmd(corpus, out), out / "_ckpt/last.pt")
    assert "stopped by signal 15" in stderr and not (out / "model.safetensors").exists()
    stopped_at = len((out / "train_log.csv").read_text().splitlines()) - 1
    assert 0 < stopped_at < 12
    rerun = subprocess.run(pretrain_cmd(corpus, out), capture_output=True, text=True, check=True)
    assert f"at step {stopped_at}" in rerun.stderr
    expected = weights(tmp_path / "straight")
    for name, tensor in weights(out).items():
        assert torch.equal(tensor, expected[name]), name


# --- damaged checkpoints ---------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(corpus, tmp_path_factory):
    """The weights of an uninterrupted run, and the folder of the same run stopped by SIGTERM
    after its second checkpoint: its _ckpt holds last.pt and prev.pt."""
    root = tmp_path_factory.mktemp("checkpoints")
    subprocess.run(pretrain_cmd(corpus, root / "straight"), check=True, capture_output=True)
    run_until_then_terminate(pretrain_cmd(corpus, root / "stopped"), root / "stopped/_ckpt/prev.pt")
    return weights(root / "straight"), root / "stopped"


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def zero_4k_in_the_middle(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    assert any(data[middle:middle + 4096]), "zeroing must change the file"
    data[middle:middle + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, resumes_from", [
    ({"last.pt": truncate}, "prev.pt"),
    ({"last.pt": zero_4k_in_the_middle}, "prev.pt"),
    ({"last.pt": zero_4k_in_the_middle, "prev.pt": truncate}, None),
], ids=["truncated", "zeroed", "both-damaged"])
def test_a_damaged_checkpoint_is_set_aside_and_the_run_still_gives_the_uninterrupted_weights(
        corpus, stopped_run, tmp_path, damage, resumes_from):
    expected, stopped = stopped_run
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    ckpt = out / "_ckpt"
    steps = {name: read_checkpoint(ckpt / name)["step"] for name in CHECKPOINTS}
    assert steps["prev.pt"] < steps["last.pt"] < 12
    for name, spoil in damage.items():
        spoil(ckpt / name)
    # What a run killed during its saves leaves: a rerun removes it.
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = gone.pid
    stale = [out / f".model.safetensors.tmp{dead}", ckpt / f".last.pt.tmp{dead}"]
    for path in stale:
        path.write_bytes(b"partial")

    rerun = subprocess.run(pretrain_cmd(corpus, out), capture_output=True, text=True, check=True)
    for name in damage:
        path = re.escape(str(ckpt / name))
        assert re.search(rf"WARNING corrupt checkpoint: {path}: (truncated|checksum mismatch).*; "
                         rf"moved it to {path}\.corrupt-", rerun.stderr), rerun.stderr[-3000:]
        assert len(list(ckpt.glob(f"{name}.corrupt-*"))) == 1
    if resumes_from:
        assert f"resumed from {ckpt / resumes_from} at step {steps[resumes_from]}" in rerun.stderr
    else:
        assert "no usable checkpoint" in rerun.stderr and "starting from scratch" in rerun.stderr
        assert "resumed from" not in rerun.stderr
    for name, tensor in weights(out).items():
        assert torch.equal(tensor, expected[name]), name
    assert not any(path.exists() for path in stale)
    assert sorted(p.name.split(".corrupt-")[0] for p in ckpt.iterdir()) == sorted(damage), \
        "finish removes the checkpoints, and keeps those set aside"


# --- launching: one process, torchrun, torchrun on each SLURM node ------------

def test_launch_runs_one_process_directly_and_several_under_torchrun():
    assert launch.command(["train.py", "--x"], nproc=1) == [sys.executable, "train.py", "--x"]
    assert launch.command(["train.py"], nproc=4) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone", "train.py"]


def test_launch_execs_the_script_with_its_arguments(tmp_path):
    script = tmp_path / "show.py"
    script.write_text("import sys; print(sys.argv[1:])")
    run = subprocess.run([sys.executable, "-m", "zhlm.train.launch", "--nproc-per-node", "1", str(script),
                          "--settings", '{"a": 1}'], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == str(["--settings", '{"a": 1}'])


def fake_scontrol(tmp_path, node_list, hosts):
    """An scontrol on PATH that answers `show job` and `show hostnames` like SLURM does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"""#!/bin/sh
if [ "$2" = job ]; then
  echo "JobId=$4 JobName=x JobState=RUNNING NumNodes={len(hosts)} NodeList={node_list} BatchHost={hosts[0]}"
else echo "{chr(10).join(hosts)}"; fi
""")
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77"}


def test_launch_over_several_nodes_starts_torchrun_on_each_through_srun(tmp_path, monkeypatch):
    env = fake_scontrol(tmp_path, "gpu[07-08]", ["gpu07", "gpu08"])
    monkeypatch.setenv("PATH", env["PATH"])
    argv = launch.command(["train.py", "--x"], nproc=8, nodes=2, env=env)
    assert argv[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        sys.executable]
    assert argv[6:] == ["-m", "torch.distributed.run", "--nproc-per-node=8", "--nnodes=2", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint=gpu07:{launch.RENDEZVOUS_PORT}", "--rdzv-id=77", "train.py", "--x"]


def test_launch_over_several_nodes_needs_a_slurm_job_of_that_size(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="need a SLURM job"):
        launch.command(["train.py"], nproc=1, nodes=2, env={})
    env = fake_scontrol(tmp_path, "gpu07", ["gpu07"])
    monkeypatch.setenv("PATH", env["PATH"])
    with pytest.raises(SystemExit, match="asks for 2 nodes but SLURM job 77 has 1"):
        launch.command(["train.py"], nproc=1, nodes=2, env=env)
