"""`zhlm chat`: talk to a model folder in the terminal, the answer streamed token by token."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from zhlm.generate import MIN_TEMPERATURE, Sampling, stream
from zhlm.inference import LoadedModel, TextStream, load
from zhlm.retrieval import Hit, Retriever, describe, open_retriever
from zhlm.tokenizer.chat import encode_prompt


@dataclass
class ChatSession:
    """A multi-turn ChatML conversation; old turns are dropped when it outgrows the context.

    With a retriever (--docs), each question's best passages join the system message for that
    question's answer, as many as leave the answer its room beside the question."""
    lm: LoadedModel
    sampling: Sampling
    system: str | None = None
    seed: int | None = None
    retriever: Retriever | None = None
    turns: list[dict] = field(default_factory=list)  # user and assistant messages, no system
    notices: list[str] = field(default_factory=list)  # what the last reply wants the user to know
    passages: list[Hit] = field(default_factory=list)  # the passages in the last question's prompt

    def __post_init__(self):
        self.generator = None
        if self.seed is not None:
            self.generator = torch.Generator(device=self.lm.device).manual_seed(self.seed)
        self.turn_system: str | None = None  # the system message with the last question's passages

    def _system_messages(self) -> list[dict]:
        content = self.turn_system or self.system
        return [{"role": "system", "content": content}] if content else []

    def messages(self) -> list[dict]:
        return self._system_messages() + self.turns

    def reset(self) -> None:
        self.turns.clear()
        self.turn_system, self.passages = None, []

    def _room(self) -> int:
        # Room for a useful answer, but never more than half the window, or little would fit.
        return min(self.sampling.max_new_tokens, self.lm.context // 2)

    def _retrieve(self) -> None:
        """Put the best passages for the newest question into this turn's system message."""
        self.turn_system, self.passages = None, []
        if self.retriever is None:
            return
        base = [{"role": "system", "content": self.system}] if self.system else []
        augmented, self.passages = self.retriever.augment(base + self.turns[-1:], self.lm.tokenizer,
                                                          self.lm.context, self._room())
        if self.passages:
            self.turn_system = augmented[0]["content"]
        self.notices.append(describe(self.passages))

    def _fit(self) -> list[int] | None:
        """The prompt ids, after dropping the oldest turns until the answer has room;
        None if the newest message does not fit even alone (then nothing is dropped)."""
        latest = encode_prompt(self.lm.tokenizer, self._system_messages() + self.turns[-1:])
        if len(latest) >= self.lm.context:
            self.notices.append(f"(that message is {len(latest)} tokens with the system prompt; "
                                f"the context holds {self.lm.context}: not sent)")
            return None
        room = self._room()
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
        self._retrieve()
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
    try:
        lm = load(args.model_dir, args.device)
        # Before the first prompt: indexing many documents takes a while, once.
        retriever = open_retriever(args.docs, args.docs_top_k, args.docs_chars) if args.docs else None
    except (FileNotFoundError, ValueError) as e:
        print(f"zhlm chat: {e}", file=sys.stderr)
        return 2
    d = lm.defaults
    try:
        sampling = Sampling(
            max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else d.max_new_tokens,
            temperature=args.temperature if args.temperature is not None else d.temperature,
            top_p=args.top_p if args.top_p is not None else d.top_p,
            repetition_penalty=args.repetition_penalty if args.repetition_penalty is not None
            else d.repetition_penalty,
        )
    except ValueError as e:
        print(f"zhlm chat: {e}", file=sys.stderr)
        return 2
    session = ChatSession(lm, sampling, system=args.system, seed=args.seed, retriever=retriever)
    mode = ("greedy" if sampling.temperature < MIN_TEMPERATURE
            else f"temperature {sampling.temperature}, top-p {sampling.top_p}")
    print(f"zhlm chat: {lm.name} on {lm.device}, {lm.context}-token context, {mode}.", flush=True)
    if retriever:
        print(f"zhlm chat: {len(retriever.index.passages)} passages of {args.docs} "
              f"({'indexed now' if retriever.index.built else 'index read from its cache'}); "
              f"each question's best {retriever.top_k} go into the system message as far as they fit.")
    print(HELP, flush=True)
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
