"""DPO against the frozen SFT model (started by python, or by torchrun for DDP)."""
import argparse
import json

from zhlm.io import setup_logging
from zhlm.train.dpo import run

parser = argparse.ArgumentParser(description=__doc__)
for flag in ("--sft", "--tokenizer", "--tokens", "--out", "--ckpt", "--settings"):
    parser.add_argument(flag, required=True)
parser.add_argument("--sft-tokens", help="the sft stage's token files, for the settings' anchor_weight")
args = parser.parse_args()
setup_logging()
run(args.sft, args.tokenizer, args.tokens, args.out, args.ckpt, settings=json.loads(args.settings),
    sft_tokens_dir=args.sft_tokens)
