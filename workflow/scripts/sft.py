"""Supervised fine-tuning on ChatML conversations: the sft stage, and the finetune stage from any model
folder (started by python, or by torchrun for DDP)."""
import argparse
import json

from zhlm.io import setup_logging
from zhlm.train.sft import run

parser = argparse.ArgumentParser(description=__doc__)
for flag in ("--init", "--tokenizer", "--tokens", "--out", "--ckpt", "--settings"):
    parser.add_argument(flag, required=True)
parser.add_argument("--pretrain-tokens", help="the pretraining token files, for the settings' pretrain_mix")
parser.add_argument("--sft-tokens", help="the sft stage's token files, for the settings' sft_mix (finetune)")
args = parser.parse_args()
setup_logging()
run(args.init, args.tokenizer, args.tokens, args.out, args.ckpt, settings=json.loads(args.settings),
    pretrain_tokens_dir=args.pretrain_tokens, sft_tokens_dir=args.sft_tokens)
