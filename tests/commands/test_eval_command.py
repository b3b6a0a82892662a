"""`glmkit eval run / compare / harness` from the command line (glmkit.commands.eval): the bundled tasks end to end
on glm-tiny (a few items each), the files written, and bad input answered with a message."""

from __future__ import annotations

import json

from glmkit.commands.cli import main
from glmkit.evaluation.run import BUNDLED_TASKS


def test_eval_run_bundled_tasks(tmp_path, capsys):
    rc = main(["eval", "run", "bundled", "--limit", "2", "--no-progress", "--output", str(tmp_path), "--precision",
               "fp32"])
    out = capsys.readouterr().out
    assert rc == 0
    results = json.loads((tmp_path / "results-fp32.json").read_text())
    names = {"LAMBADA-tiny", "NextLine-tiny", "NextLine-letters-tiny", "Couplet-tiny", "TangPoems-lm"}
    assert set(results["tasks"]) == names
    assert results["tasks"]["LAMBADA-tiny"]["groups"]["prose"]["files"]["prose/test.jsonl"]["n"] == 2
    for name in names:
        assert f"| {name} |" in out
    assert (tmp_path / "results-fp32.md").read_text() in out


def test_eval_compare(tmp_path, capsys):
    rc = main(["eval", "compare", str(BUNDLED_TASKS / "next-line.yaml"), "--precisions", "fp32,int8", "--limit", "3",
               "--no-progress", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[0] == "| task | group | metric | fp32 | int8 | Δ int8 |"
    assert "| NextLine-tiny | poems | Accuracy |" in out and "| NextLine-tiny | all | Accuracy |" in out
    assert (tmp_path / "results-int8.json").exists() and (tmp_path / "compare.md").read_text() == out


def test_eval_bad_input(tmp_path, capsys):
    assert main(["eval", "run", str(tmp_path / "missing.yaml"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "t.yaml").write_text("name: t\ntype: mul\npath: nowhere\n")
    assert main(["eval", "run", str(tmp_path / "t.yaml"), "--no-progress"]) == 2
    assert "data folder" in capsys.readouterr().err
    assert main(["eval", "compare", str(tmp_path / "t.yaml"), "--precisions", "int3"]) == 2
    assert "precisions must be" in capsys.readouterr().err


def test_eval_harness_hands_arguments_to_lm_eval(capsys):
    assert main(["eval", "harness", "ls", "--help"]) == 0  # lm-eval's own subcommand and help
    assert "lm-eval ls" in capsys.readouterr().out
