"""The `zhlm` command: `zhlm chat MODEL_DIR`, `zhlm serve MODEL_DIR`, `zhlm export gguf MODEL_DIR OUT.gguf`."""
from __future__ import annotations

import argparse
import os
import sys

from zhlm.export import DTYPES, ExportConfig
from zhlm.retrieval import REFERENCE_CHARS, TOP_K


def add_docs_arguments(parser: argparse.ArgumentParser) -> None:
    """--docs and its settings, the same for chat and serve (see zhlm.retrieval)."""
    parser.add_argument("--docs", metavar="PATH",
                        help="a folder of .txt/.md files or a parquet file (a `text` column, `id` if present): "
                             "the best passages for each question go into the system message; the index is "
                             "cached under ~/.cache/zhlm/retrieval/ and rebuilt when the documents change")
    parser.add_argument("--docs-top-k", type=int, default=TOP_K, metavar="K", help="passages searched per "
                        f"question (default {TOP_K}), put into the prompt as far as they leave the answer its room")
    parser.add_argument("--docs-chars", type=int, default=REFERENCE_CHARS, metavar="N",
                        help=f"most characters of the passages in the prompt (default {REFERENCE_CHARS})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zhlm", description="Talk to a trained zhlm model folder.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = sub.add_parser("chat", help="chat in the terminal, the answer streamed token by token",
                          description="Chat with a model folder (e.g. results/dpo) in the terminal. "
                                      "Commands: /system TEXT, /reset, /quit (or Ctrl-D).")
    chat.add_argument("model_dir", help="a Hugging Face model folder, e.g. results/dpo")
    # Unset sampling flags take the folder's generation_config.json (greedy for zhlm folders).
    chat.add_argument("--temperature", type=float, help="0 is greedy (default: generation_config.json, else 0)")
    chat.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0)")
    chat.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default: generation_config.json)")
    chat.add_argument("--repetition-penalty", type=float, help="above 1 discourages repeats (default 1.0)")
    chat.add_argument("--system", help="system prompt to start with")
    chat.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    chat.add_argument("--seed", type=int, help="seed for sampling, for reproducible answers")
    add_docs_arguments(chat)

    serve = sub.add_parser("serve", help="serve the OpenAI chat completions API",
                           description="Serve a model folder over the OpenAI chat completions API "
                                       "(POST /v1/chat/completions, GET /v1/models, GET /health).")
    serve.add_argument("model_dir", help="a Hugging Face model folder, e.g. results/dpo")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("ZHLM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $ZHLM_API_KEY; none if unset)")
    serve.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    serve.add_argument("--max-batch", type=int, default=16, help="most requests decoded together (default 16)")
    add_docs_arguments(serve)

    export = sub.add_parser("export", help="write a model folder in another format",
                            description="Write a model folder in another format.")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    gguf = formats.add_parser("gguf", help="one GGUF file for llama.cpp, ollama, LM Studio",
                              description="Write a model folder as one GGUF file (llama.cpp's llama architecture, "
                                          "the BPE tokenizer and the ChatML template inside).")
    gguf.add_argument("model_dir", help="a zhlm model folder, e.g. results/dpo")
    gguf.add_argument("out", help="the .gguf file to write")
    gguf.add_argument("--dtype", choices=DTYPES, default=ExportConfig.dtype,
                      help=f"type of the weight matrices; norms stay f32 (default {ExportConfig.dtype})")
    gguf.add_argument("--modelfile", action="store_true", help="also write an ollama Modelfile beside OUT")
    return parser


def export(args) -> int:
    from zhlm.export import export_for_ollama, export_gguf

    summary = (export_for_ollama if args.modelfile else export_gguf)(args.model_dir, args.out, args.dtype)
    types = ", ".join(f"{n} {t}" for t, n in summary["tensors"].items())
    print(f"{args.out}: {summary['bytes'] / 2**20:.1f} MiB, {args.dtype} ({types} tensors)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so that `zhlm chat` does not pay for importing the web stack.
    if args.command == "chat":
        from zhlm.chat import run
        return run(args)
    if args.command == "export":
        return export(args)
    from zhlm.serve import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
