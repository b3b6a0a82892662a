"""The base install runs models: with every extra's packages made unimportable, `glmkit --help`, each command's
--help, generate, fill, quantize and a piped chat on glm-tiny work, and serve/web/eval harness/LoRA name the
`pip install 'glmkit[...]'` that brings what they lack.

The packages are hidden by a meta-path finder placed first in a fresh interpreter, so `import fastapi` there fails
as it would where the package is not installed, while this test's own environment keeps everything.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from glmkit.commands.cli import COMMANDS
from glmkit.core.extras import EXTRAS, MissingExtraError, require_extra
from tests.helpers.common import REPO

BLOCKED = ("fastapi", "uvicorn", "starlette", "prometheus_client", "gradio", "peft", "transformers", "tensorboard",
           "rouge_chinese", "jieba", "nltk", "lm_eval", "google")

# Run as `python -c PRELUDE + body`: hides BLOCKED, then runs the body.
PRELUDE = f"""
import sys
BLOCKED = {BLOCKED!r}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the extras test)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from glmkit.commands.cli import main
"""


def run_blocked(body: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + body], cwd=REPO, input=stdin, capture_output=True,
                          text=True, timeout=300)


def cli(*argv: str) -> str:
    return f"\nsys.exit(main({list(argv)!r}))\n"


def test_every_extra_package_is_hidden_by_the_prelude():
    names = [n for names in EXTRAS.values() for n in names]
    body = "\nimport importlib\nfor n in %r:\n" % (names,) + (
        "    try:\n        importlib.import_module(n)\n    except ImportError:\n        continue\n"
        "    sys.exit(f'{n} imported')\n")
    out = run_blocked(body)
    assert out.returncode == 0, out.stdout + out.stderr


def test_help_of_glmkit_and_of_every_command_needs_no_extra():
    body = f"""
import contextlib, io
assert main(["--help"]) == 0
assert main(["--version"]) == 0
for name in {sorted(COMMANDS)!r}:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            main([name, "--help"])
    except SystemExit as e:
        assert e.code == 0, (name, e.code)
    else:
        raise AssertionError(name + " --help did not exit")
    assert "usage:" in buf.getvalue(), name
    print("ok", name)
hidden = [m for m in sys.modules if m.partition(".")[0] in BLOCKED]
assert not hidden, hidden
"""
    out = run_blocked(body)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(line[3:] for line in out.stdout.splitlines() if line.startswith("ok ")) == sorted(COMMANDS)


def test_generate_fill_and_quantize_on_glm_tiny_need_no_extra(tmp_path):
    gen = run_blocked(cli("generate", "春眠不覺曉，", "--max-new-tokens", "8", "--seed", "0", "--quantize", "int4"))
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip(), "generate printed nothing"
    fill = run_blocked(cli("fill", "床前明月[MASK]，疑是地上霜。", "--seed", "0"))
    assert fill.returncode == 0, fill.stderr
    assert "疑是地上霜" in fill.stdout
    quant = run_blocked(cli("quantize", "glm-tiny", str(tmp_path / "q8"), "--bits", "8"))
    assert quant.returncode == 0, quant.stderr
    assert (tmp_path / "q8" / "config.json").is_file()


def test_piped_chat_on_glm_tiny_needs_no_extra():
    out = run_blocked(cli("chat", "--seed", "0", "--max-length", "96"), stdin="作者#李白*體裁#五言絕句*題目#靜夜思\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "chat answered nothing"


@pytest.mark.parametrize("argv, extra", [
    (("serve", "--model", "glm-tiny"), "serve"),
    (("web", "--model", "glm-tiny"), "web"),
    (("eval", "harness", "--tasks", "lambada_openai"), "eval"),
    (("generate", "x", "--adapter", "{lora}"), "train"),  # a LoRA adapter needs PEFT
])
def test_a_command_without_its_extra_names_the_pip_command(argv, extra, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    out = run_blocked(cli(*(a.format(lora=tmp_path) for a in argv)))
    assert out.returncode != 0
    assert f"pip install 'glmkit[{extra}]'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_require_extra_passes_when_installed_and_rejects_unknown_extras():
    require_extra("serve", "fastapi")  # the test environment has every extra
    with pytest.raises(ValueError, match="unknown extra"):
        require_extra("nope")
    with pytest.raises(MissingExtraError, match=r"pip install 'glmkit\[web\]'"):
        require_extra("web", "glmkit_no_such_module", what="x")
