"""`glmkit chat` driven through a real pseudo-terminal (an answer, `clear`, Ctrl-C, `stop`, Ctrl-D) and a pipe.

Also holds `build_tiny_chat_model`, the tiny random checkpoint + trained tokenizer that test_serve.py and
test_web.py reuse (the bundled model is not needed for these tests).
"""

from __future__ import annotations

import codecs
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.chat_models import build_tiny_chat_model
from tests.helpers.common import REPO


# ------------------------------------------------------------------------------------------------ helpers
def test_text_delta_pieces_add_up_to_the_final_text():
    from glmkit.core.chat import TextDelta

    # versions of a growing answer as chat() post-processes them: a pending UTF-8 byte, trailing spaces, and a
    # half-width comma that turns full-width once a CJK character follows
    versions = ["He", "Hel\ufffd", "Hello ", "Hello 你", "Hello 你,", "Hello 你，好", "Hello 你，好 "]
    delta = TextDelta()
    pieces = [delta.update(v) for v in versions]
    pieces.append(delta.finish("Hello 你，好!"))
    assert "".join(pieces) == "Hello 你，好!"
    assert pieces[1] == "l" and pieces[4] == ""  # held back: the U+FFFD, the comma


def test_response_text():
    from glmkit.core.chat import response_text

    assert response_text("hi") == "hi"
    assert response_text({"name": "weather", "content": "call it"}) == "weather\ncall it"
    assert response_text({"name": "f", "parameters": {"x": 1}}) == 'f\n{"x": 1}'


# ------------------------------------------------------------------------------------------------ pty driver
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


class Terminal:
    """`glmkit chat` on a pseudo-terminal, read and written like a user would."""

    def __init__(self, argv: list[str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # child: the pty is its controlling terminal, so Ctrl-C (\x03) becomes SIGINT
            os.environ["TERM"] = "dumb"
            os.execv(sys.executable, [sys.executable, "-m", "glmkit", "chat", *argv])
        self.pid, self.fd, self.buffer = pid, fd, ""
        # a multi-byte character can be split across reads
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def read_until(self, pattern: str, timeout: float = 60.0) -> str:
        """Reads until `pattern` (a regex) appears in the screen text after the last match; returns that text."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            clean = ANSI.sub("", self.buffer)
            m = regex.search(clean)
            if m:
                self.buffer = clean[m.end():]
                return clean[: m.end()]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; the screen shows:\n{clean[-2000:]}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # the child exited and the pty closed
                    data = b""
                if not data:
                    raise AssertionError(f"glmkit chat exited while waiting for {pattern!r}:\n{clean[-2000:]}")
                self.buffer += self.decoder.decode(data)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining so the child never blocks on a full pty
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.buffer += self.decoder.decode(os.read(self.fd, 4096))
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise AssertionError("glmkit chat did not exit")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("chat") / "tiny-endless", "chatglm", endless=True)


def _answer_text(screen: str, name: str) -> str:
    return screen.split(f"{name}: ", 1)[1].rsplit("You:", 1)[0].strip()


@pytest.mark.slow
def test_terminal_session(endless_model):
    name = endless_model.name
    # greedy, so the same question gets the same answer; each answer is 16 tokens (the model never stops)
    term = Terminal(["--model", str(endless_model), "--temperature", "0", "--max-new-tokens", "16"])
    try:
        welcome = term.read_until(r"You: ")
        assert f"glmkit chat with {name}" in welcome
        assert "'clear'" in welcome and "'stop'" in welcome and "Ctrl-C" in welcome

        term.send("hello world\n")
        first = _answer_text(term.read_until(r"\nYou: "), name)
        assert first, "no answer was printed"

        # a second turn sees the history, so (greedy) it starts from a different prompt than the first one
        term.send("hello world\n")
        second = _answer_text(term.read_until(r"\nYou: "), name)

        term.send("clear\n")
        assert "History cleared." in term.read_until(r"You: ")
        term.send("hello world\n")
        again = _answer_text(term.read_until(r"\nYou: "), name)
        assert again == first, "after 'clear' the same question must get the first answer again"
        assert second != first, "the second turn should have seen the history"
    finally:
        term.send("stop\n")
        code = term.wait()
    assert code == 0


@pytest.mark.slow
def test_ctrl_c_interrupts_answer_and_chat_continues(endless_model):
    name = endless_model.name
    # a long answer (the model never picks a stop token) that Ctrl-C cuts short
    term = Terminal(["--model", str(endless_model), "--temperature", "0"])
    try:
        term.read_until(r"You: ")
        term.send("tell me a long story\n")
        term.read_until(f"{re.escape(name)}: \\S")  # the answer has started streaming
        start = time.monotonic()
        term.send("\x03")
        screen = term.read_until(r"\[interrupted\]", timeout=20)
        assert time.monotonic() - start < 15
        assert "Traceback" not in screen
        term.read_until(r"You: ")
        term.send("clear\n")  # still alive and reading commands
        assert "History cleared." in term.read_until(r"You: ")
        term.send("\x04")  # Ctrl-D at the prompt quits
        code = term.wait()
    except BaseException:
        term.kill()
        raise
    assert code == 0


def _run_pipe(model: Path, text: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmkit", "chat", "--model", str(model), "--temperature", "0",
                           "--max-new-tokens", "16"], input=text, capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.slow
def test_pipe_mode(endless_model):
    run = _run_pipe(endless_model, "hello world\nclear\n\nhello world\nhello world\nstop\nnever answered\n")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split("\n")
    # one line per answered input (the empty line, the commands and everything after 'stop' get none)
    assert len(lines) == 4 and lines[3] == "", run.stdout
    assert lines[0] and lines[0] == lines[1], "'clear' must reset the history between the first two questions"
    assert lines[2] != lines[1], "without 'clear' the third question is asked with the second turn as history"
    assert "You:" not in run.stdout and "glmkit chat" not in run.stdout  # no decoration on stdout
    assert "glmkit chat with" in run.stderr  # the welcome line goes to stderr


@pytest.mark.slow
def test_quantized_model_chats(endless_model):
    run = subprocess.run([sys.executable, "-m", "glmkit", "chat", "--model", str(endless_model), "--quantize", "int8",
                          "--temperature", "0", "--max-new-tokens", "8"], input="hello world\n", capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and run.stdout.count("\n") == 1


@pytest.mark.slow
def test_bad_arguments():
    run = subprocess.run([sys.executable, "-m", "glmkit", "chat", "--top-p", "1.5"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert run.returncode == 2 and "--top-p" in run.stderr
    run = subprocess.run([sys.executable, "-m", "glmkit", "chat", "--model", "/nonexistent/model"],
                         capture_output=True, text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)
    assert run.returncode == 1 and "cannot load" in run.stderr

