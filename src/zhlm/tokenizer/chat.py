"""ChatML conversations: the text the chat template renders, and its loss mask.

`<|im_start|>{role}\n{content}<|im_end|>\n` per message. In training only the
assistant's content and its `<|im_end|>` carry loss; the tokens are those of
the whole rendered text, exactly as the model sees it when chatting.
"""
from __future__ import annotations

import json

from tokenizers import Tokenizer

IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
ROLES = ("system", "user", "assistant")
IGNORE = -100


def messages_of(row: dict) -> list[dict]:
    """The conversation of an sft row: optional system, earlier turns, the prompt and the response."""
    messages = []
    if row.get("system"):
        messages.append({"role": "system", "content": row["system"]})
    if row.get("history"):
        messages += json.loads(row["history"])
    messages.append({"role": "user", "content": row["prompt"]})
    if row.get("response") is not None:
        messages.append({"role": "assistant", "content": row["response"]})
    return messages


def render(messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The ChatML text, and the character spans that carry loss (assistant content + <|im_end|>)."""
    text, spans = "", []
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r}: one of {', '.join(ROLES)}")
        text += f"{IM_START}{m['role']}\n"
        start = len(text)
        text += m["content"] + IM_END
        if m["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text, spans


def encode_chat(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and labels: the id where it carries loss, IGNORE elsewhere."""
    return encode_chats(tokenizer, [messages])[0]


def encode_chats(tokenizer: Tokenizer, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """encode_chat for many conversations at once, through the tokenizer's parallel batch encoder."""
    rendered = [render(messages) for messages in conversations]
    encodings = tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    out = []
    for (_, spans), encoding in zip(rendered, encodings):
        labels = [token if any(s <= start and end <= e for s, e in spans) else IGNORE
                  for token, (start, end) in zip(encoding.ids, encoding.offsets)]
        out.append((encoding.ids, labels))
    return out


def encode_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ending with the assistant's turn opened, for generation."""
    return tokenizer.encode(render(messages, add_generation_prompt=True)[0], add_special_tokens=False).ids


def chat_stop_ids(tokenizer: Tokenizer) -> list[int]:
    """The tokens that end an assistant turn: <|im_end|>, and <|endoftext|> as a fallback."""
    return [tokenizer.token_to_id(IM_END), tokenizer.token_to_id(EOT)]
