"""`zhlm chat`: talk to a model folder in the terminal, the answer streamed token by token.

Also home of what chat and serve share: loading a model folder (weights,
tokenizer, stop tokens, generation defaults) and turning generated token ids
into text pieces without splitting a multi-byte character.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer

from zhlm.generate import Sampling, stream
from zhlm.model import LlamaModel, load_model
from zhlm.tokenizer.chat import chat_stop_ids, encode_prompt


def pick_device(name: str = "auto") -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


@dataclass
class LoadedModel:
    """A model folder ready to generate: the decoder, its tokenizer, stop tokens, sampling defaults."""
    model: LlamaModel
    tokenizer: Tokenizer
    stop_ids: list[int]
    defaults: Sampling
    name: str

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings


def load(model_dir, device: str = "cpu") -> LoadedModel:
    """Load a Hugging Face model folder (config.json, model.safetensors, tokenizer.json, ...)."""
    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir}: no {name}; expected a model folder such as results/dpo")
    model = load_model(model_dir, device).eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id", [])
    eos = eos if isinstance(eos, list) else [eos]
    # The ChatML end of turn first, then whatever else the folder declares as an end.
    stop_ids = list(dict.fromkeys(i for i in [*chat_stop_ids(tokenizer), *eos] if i is not None))
    # Greedy unless the folder asks for sampling, as transformers' generate() does.
    defaults = Sampling(
        max_new_tokens=int(gen.get("max_new_tokens", 256)),
        temperature=float(gen.get("temperature", 1.0)) if gen.get("do_sample") else 0.0,
        top_p=float(gen.get("top_p", 1.0)),
        repetition_penalty=float(gen.get("repetition_penalty", 1.0)),
    )
    return LoadedModel(model, tokenizer, stop_ids, defaults, model_dir.resolve().name)


class TextStream:
    """Generated token ids in, new text out.

    A byte-level token can end in the middle of a multi-byte character, so the
    whole answer so far is decoded each time and only complete new text is
    returned; a trailing replacement character waits for the next token.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        if not text.startswith(self.text):  # cannot happen with a byte-level decoder; stay safe
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self) -> str:
        """What is left at the end (bytes that never made a whole character)."""
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += new
        return new


@dataclass
class ChatSession:
    """A multi-turn ChatML conversation; old turns are dropped when it outgrows the context."""
    lm: LoadedModel
    sampling: Sampling
    system: str | None = None
    seed: int | None = None
    turns: list[dict] = field(default_factory=list)  # user and assistant messages, no system
    notices: list[str] = field(default_factory=list)  # what the last reply wants the user to know

    def __post_init__(self):
        self.generator = None
        if self.seed is not None:
            device = next(self.lm.model.parameters()).device
            self.generator = torch.Generator(device=device).manual_seed(self.seed)

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def reset(self) -> None:
        self.turns.clear()

    def _fit(self) -> list[int] | None:
        """The prompt ids, after dropping the oldest turns until the answer has room;
        None if the newest message does not fit even alone (then nothing is dropped)."""
        latest = [{"role": "system", "content": self.system}] if self.system else []
        latest = encode_prompt(self.lm.tokenizer, latest + self.turns[-1:])
        if len(latest) >= self.lm.context:
            self.notices.append(f"(that message is {len(latest)} tokens with the system prompt; "
                                f"the context holds {self.lm.context}: not sent)")
            return None
        # Room for a useful answer, but never more than half the window, or little would fit.
        room = min(self.sampling.max_new_tokens, self.lm.context // 2)
        dropped = 0
        ids = encode_prompt(self.lm.tokenizer, self.messages())
        while len(ids) + room > self.lm.context and len(self.turns) > 1:
            # Drop the oldest exchange: a user message and the answer to it.
            del self.turns[0]
            while self.turns and self.turns[0]["role"] != "user":
                del self.turns[0]
            dropped += 1
            ids = encode_prompt(self.lm.tokenizer, self.messages())
        if dropped:
            self.notices.append(f"(the conversation outgrew the {self.lm.context}-token context: "
                                f"dropped the {dropped} oldest turn{'s' if dropped > 1 else ''})")
        return ids

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's message and stream the answer; the answer joins the conversation
        (even when the caller stops early, e.g. on Ctrl-C)."""
        self.notices = []
        self.turns.append({"role": "user", "content": text})
        prompt = self._fit()
        if prompt is None:
            self.turns.pop()
            return
        out = TextStream(self.lm.tokenizer)
        answer, finished = [], False
        try:
            for token in stream(self.lm.model, [prompt], self.sampling, stop_ids=self.lm.stop_ids,
                                generator=self.generator):
                token = int(token[0])
                if token in self.lm.stop_ids:
                    finished = True
                    break
                piece = out.push(token)
                answer.append(piece)
                yield piece
            tail = out.flush()
            answer.append(tail)
            yield tail
            if not finished:
                self.notices.append(f"(answer cut at {len(out.ids)} tokens)")
        finally:
            self.turns.append({"role": "assistant", "content": "".join(answer)})


HELP = "commands: /system TEXT (set the system prompt; /system alone clears it), /reset, /quit (or Ctrl-D)"


def run(args) -> int:
    """The REPL behind `zhlm chat`."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    if args.seed is not None:
        torch.manual_seed(args.seed)
    device = pick_device(args.device)
    try:
        lm = load(args.model_dir, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"zhlm chat: {e}", file=sys.stderr)
        return 2
    d = lm.defaults
    sampling = Sampling(
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else d.max_new_tokens,
        temperature=args.temperature if args.temperature is not None else d.temperature,
        top_p=args.top_p if args.top_p is not None else d.top_p,
        repetition_penalty=args.repetition_penalty if args.repetition_penalty is not None else d.repetition_penalty,
    )
    session = ChatSession(lm, sampling, system=args.system, seed=args.seed)
    mode = "greedy" if sampling.temperature <= 0 else f"temperature {sampling.temperature}, top-p {sampling.top_p}"
    print(f"zhlm chat: {lm.name} on {device}, {lm.context}-token context, {mode}.\n{HELP}", flush=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/quit", "/exit", "/bye"):
                return 0
            if command == "/reset":
                session.reset()
                print("(conversation cleared)")
            elif command == "/system":
                session.system = rest.strip() or None
                print(f"(system prompt: {session.system})" if session.system else "(system prompt cleared)")
            else:
                print(HELP)
            continue
        answer, shown = session.reply(line), 0
        try:
            for piece in answer:
                if shown < len(session.notices):  # dropped turns: say so before the answer
                    print("\n".join(session.notices[shown:]))
                    shown = len(session.notices)
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the chat
            print()
            session.notices.append("(stopped)")
        finally:
            answer.close()  # the partial answer joins the conversation now
        for notice in session.notices[shown:]:
            print(notice)
