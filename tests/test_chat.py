"""`zhlm chat`: the session's streaming and context trimming, and the real command in a pseudo-terminal."""
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from zhlm.chat import ChatSession
from zhlm.generate import Sampling, generate, next_tokens
from zhlm.inference import TextStream, load
from zhlm.tokenizer.chat import encode_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm(model_dir):
    return load(model_dir)


def test_text_stream_never_splits_a_character(lm):
    ids = lm.tokenizer.encode("好评！质量不错 👍").ids
    out = TextStream(lm.tokenizer)
    pieces = [out.push(i) for i in ids] + [out.flush()]
    assert "".join(pieces) == "好评！质量不错 👍"
    assert not any("\ufffd" in p for p in pieces)


def test_a_session_streams_the_greedy_answer_and_keeps_the_conversation(lm):
    session = ChatSession(lm, Sampling(max_new_tokens=10), system="你是一个购物助手。")
    pieces = list(session.reply("这个手机怎么样？"))
    messages = [{"role": "system", "content": "你是一个购物助手。"}, {"role": "user", "content": "这个手机怎么样？"}]
    ids = generate(lm.model, [encode_prompt(lm.tokenizer, messages)], Sampling(max_new_tokens=10),
                   stop_ids=lm.stop_ids)[0]
    assert "".join(pieces) == lm.tokenizer.decode(ids)
    assert len([p for p in pieces if p]) > 1
    list(session.reply("价格呢？"))
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages() == [{"role": "system", "content": "你是一个购物助手。"}]


def test_old_turns_are_dropped_when_the_context_is_full_but_the_system_prompt_stays(lm):
    session = ChatSession(lm, Sampling(max_new_tokens=16), system="你是客服。")
    dropped = []
    for i in range(8):
        "".join(session.reply(f"第{i}个问题：这个东西好不好？"))
        dropped += session.notices
        prompt = encode_prompt(lm.tokenizer, session.messages())
        assert len(prompt) <= lm.context
    assert any("dropped" in n for n in dropped)
    assert session.messages()[0] == {"role": "system", "content": "你是客服。"}
    assert session.messages()[-2]["content"] == "第7个问题：这个东西好不好？"
    assert session.messages()[1]["role"] == "user"
    before = session.messages()
    list(session.reply("长" * 500))  # longer than the whole context: refused, and nothing is dropped
    assert "not sent" in session.notices[0] and session.messages() == before


class Terminal:
    """`zhlm chat` on a pseudo-terminal, read with timeouts."""

    def __init__(self, *args):
        master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "zhlm.cli", "chat", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.fd, self.seen = master, b""

    def read_until(self, marker: bytes, timeout: float = 30) -> bytes:
        """The output up to and including `marker`."""
        deadline = time.time() + timeout
        while marker not in self.seen:
            left = deadline - time.time()
            assert left > 0, f"no {marker!r} within {timeout}s; got {self.seen[-500:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                assert chunk, f"the chat ended before {marker!r}; got {self.seen[-500:]!r}"
                self.seen += chunk
        out, _, self.seen = self.seen.partition(marker)
        return out + marker

    def type(self, line: str) -> bytes:
        """Type a line and return what the chat printed before its next prompt."""
        os.write(self.fd, line.encode() + b"\n")
        return self.read_until(b">>> ")

    def close(self):
        os.close(self.fd)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def shown(text: str) -> bytes:
    return text.encode().replace(b"\n", b"\r\n")  # the terminal turns \n into \r\n


def test_zhlm_chat_in_a_terminal(model_dir, lm):
    expected = ChatSession(lm, Sampling(max_new_tokens=12))
    term = Terminal(str(model_dir), "--max-new-tokens", "12", "--temperature", "0")
    try:
        assert b"/system" in term.read_until(b">>> ")
        for question in ("这个手机怎么样？", "价格呢？"):
            answer = "".join(expected.reply(question))
            assert shown(answer) in term.type(question)
        assert "你是客服。" in term.type("/system 你是客服。").decode()
        expected.system = "你是客服。"
        assert shown("".join(expected.reply("好用吗？"))) in term.type("好用吗？")
        assert b"cleared" in term.type("/reset")
        expected.reset()
        assert shown("".join(expected.reply("这个手机怎么样？"))) in term.type("这个手机怎么样？")
        os.write(term.fd, b"/quit\n")
        assert term.proc.wait(timeout=20) == 0
    finally:
        term.close()


def test_ctrl_d_leaves_the_chat(model_dir):
    term = Terminal(str(model_dir))
    try:
        term.read_until(b">>> ")
        os.write(term.fd, b"\x04")  # Ctrl-D on an empty line: end of input
        assert term.proc.wait(timeout=20) == 0
    finally:
        term.close()


def test_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path):
    run = subprocess.run([sys.executable, "-m", "zhlm.cli", "chat", str(tmp_path)], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=60)
    assert run.returncode == 2 and "config.json" in run.stderr


@pytest.mark.parametrize("field, value", [("temperature", float("nan")), ("temperature", -1.0),
                                          ("top_p", 0.0), ("top_p", float("inf")),
                                          ("repetition_penalty", 0.0), ("max_new_tokens", 0)])
def test_sampling_refuses_values_that_would_break_decoding(field, value):
    with pytest.raises(ValueError, match=field):
        Sampling(**{field: value})


def test_a_tiny_temperature_decodes_greedily():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert next_tokens(logits, Sampling(temperature=1e-300), None).tolist() == [1, 0]
