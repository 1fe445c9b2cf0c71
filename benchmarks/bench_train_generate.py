"""Training tokens/s and MFU, and generation tokens/s beside transformers' generate().

    python benchmarks/bench_train_generate.py [--layers 6 --width 384 --heads 6 --vocab 8000
                                               --batch 8 --seq 256 --steps 8] [--compile]

Training steps are the pipeline's own: `pretrain.next_token_loss`, `loop.make_optimizer`,
gradient clipping, and with --compile the loss function compiled as `loop.train`
compiles it (the compile time is reported; a rerun takes less, as inductor caches
its code). MFU is measured against the matmul peak of this machine, measured in
the same run (fp32, and bf16 for bf16 autocast). Generation: 128 new tokens after
a 32-token prompt, greedy, at batch 1 and 16, our KV-cache loop against
`transformers`' `generate()` on the same exported model.
"""
import argparse
import tempfile
import time

import torch

from zhlm.generate import Sampling, generate
from zhlm.lm import count_labels
from zhlm.model import LlamaForCausalLM, ModelConfig, save_model
from zhlm.train.loop import TrainConfig, make_optimizer, matmul_peak_flops
from zhlm.train.pretrain import next_token_loss


def train_speed(model, batch, seq, steps, amp, compile_loss):
    """Tokens/s of pretraining steps as `zhlm.train.loop.train` runs them, and the seconds spent compiling.

    The same loss (`pretrain.next_token_loss`), optimizer (`make_optimizer`) and, with
    `compile_loss`, the same compiled region (the loss function, model included).
    """
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4), device)
    loss_fn = torch.compile(next_token_loss) if compile_loss else next_token_loss
    x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=device)
    data = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    times = []
    for _ in range(steps + 2):  # the first two are warm-up (and compilation)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = loss_fn(model, data)
        (loss / count_labels(data["labels"])).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times[2:])[len(times[2:]) // 2]  # median step
    return batch * seq / seconds, sum(times[:2]) - 2 * seconds


def generation_speed(fn, batch, new_tokens, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return batch * new_tokens / best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=int(args.width * 8 / 3),
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(args.seq, 256))
    model = LlamaForCausalLM(config).to(device)
    flops_per_token = model.flops_per_token(args.seq)
    print(f"device {device}, threads {torch.get_num_threads()}; model {config.num_parameters() / 1e6:.1f}M parameters, "
          f"{args.layers} layers, width {args.width}, vocab {args.vocab}; batch {args.batch} x {args.seq}")
    peak = {"fp32": matmul_peak_flops(device, torch.float32), "bf16": matmul_peak_flops(device, torch.bfloat16)}
    print(f"matmul peak: fp32 {peak['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:,.0f} GFLOP/s")
    runs = [("fp32", False, False), ("bf16 autocast", True, False)]
    if args.compile:
        runs += [("fp32 + compile", False, True), ("bf16 autocast + compile", True, True)]
    for name, amp, compile_loss in runs:
        tps, compile_seconds = train_speed(model, args.batch, args.seq, args.steps, amp, compile_loss)
        flops = tps * flops_per_token
        ref = "bf16" if amp else "fp32"
        print(f"train {name:24s} {tps:9,.0f} tokens/s  {flops / 1e9:7,.0f} GFLOP/s  MFU {flops / peak[ref]:.2f} "
              f"(of the {ref} peak)" + (f"; compiling took {compile_seconds:.0f} s" if compile_loss else ""))

    from transformers import AutoModelForCausalLM

    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp).to(device).eval()
    new = 128
    for batch in (1, 16):  # each lambda below runs within its iteration
        prompts = torch.randint(3, args.vocab, (batch, 32), device=device)
        ours = generation_speed(lambda: generate(model, prompts.tolist(), Sampling(max_new_tokens=new)),  # noqa: B023
                               batch, new)
        with torch.inference_mode():
            theirs = generation_speed(lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts),  # noqa: B023
                                                          max_new_tokens=new, min_new_tokens=new,
                                                          do_sample=False, pad_token_id=0), batch, new)
        print(f"generate batch {batch:2d}: zhlm {ours:8,.0f} tokens/s, transformers {theirs:8,.0f} tokens/s, "
              f"{ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
