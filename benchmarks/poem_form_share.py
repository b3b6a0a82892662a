"""Share of generated poems with the form their prompt asks for (五言/七言 絕句/律詩), from `glmkit finetune
--do_predict`'s generated_predictions.txt and the test file it predicted (same order), with the run's ROUGE-L.

    python benchmarks/poem_form_share.py OUT/generated_predictions.txt ../shared/data/finetune/poem-gen/dev.json \\
        [--prompt_column content]

Prints one JSON line: {"form_share", "answers", "rouge-l" (from OUT/predict_results.json when present)}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glmkit.training.rewards import form_share


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("predictions")
    p.add_argument("test_file")
    p.add_argument("--prompt_column", default="content")
    a = p.parse_args()
    preds = [json.loads(line)["predict"] for line in Path(a.predictions).read_text(encoding="utf-8").splitlines()
             if line.strip()]
    rows = [json.loads(line) for line in Path(a.test_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [r[a.prompt_column] for r in rows[:len(preds)]]
    out = {"form_share": round(form_share(prompts, preds), 4), "answers": len(preds)}
    results = Path(a.predictions).with_name("predict_results.json")
    if results.is_file():
        out["rouge-l"] = json.loads(results.read_text(encoding="utf-8")).get("predict_rouge-l")
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
