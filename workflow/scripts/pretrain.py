"""Pretrain a fresh decoder on the token files (started by python, or by torchrun for DDP)."""
import argparse
import json

from zhlm.io import setup_logging
from zhlm.train.pretrain import run

parser = argparse.ArgumentParser(description=__doc__)
for flag in ("--tokens", "--tokenizer", "--out", "--ckpt", "--model", "--settings"):
    parser.add_argument(flag, required=True)
args = parser.parse_args()
setup_logging()
run(args.tokens, args.tokenizer, args.out, args.ckpt,
    model_settings=json.loads(args.model), settings=json.loads(args.settings))
