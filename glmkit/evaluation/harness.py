"""glmkit as a model backend of EleutherAI's lm-evaluation-harness (lm-eval 0.4): the `LM` subclass `GLMKitLM`,
registered as `glmkit` when this module is imported, so that any lm-eval task runs on any glmkit model, quantized or
not.

    glmkit eval harness --model glmkit --model_args pretrained=glm-tiny,quantize=int4 \\
        --tasks lambada_openai --include_path DIR --output_path OUT --batch_size 8

lm-eval 0.4.13 discovers no external backends, so `glmkit eval harness` (`run_harness`) imports this module and
hands its arguments unchanged to lm-eval's own command line. From Python:

    import lm_eval
    from glmkit.evaluation.harness import GLMKitLM
    lm_eval.simple_evaluate(model=GLMKitLM(pretrained="glm-tiny"), tasks=[...])

model_args: pretrained (folder, bundled name or hub id; default glm-tiny), dtype, quantize (int8 | int4), device,
blank ([gMASK] default, or [MASK]: the blank a blank-infilling model's context gets), max_length (default: the
model's), max_gen_toks (default 256).

The requests map onto glmkit's own evaluation code, in each family's layout (glmkit.core.scoring's module doc):

- loglikelihood(context, continuation): the continuation is a choice of `score_choices(context + blank,
  [continuation])`: tokenized on its own, after the context (causal families) or as Part B at the blank (the
  original GLM, ChatGLM-6B-layout models). Requests sharing a context are packed into one row, as `glmkit eval`
  packs a multiple-choice item's choices, so the two give the same numbers. Returns (sum of log-probs, whether
  every token is the argmax).
- loglikelihood_rolling(text): lm-eval's disjoint rolling windows (lm_eval.utils.get_rolling_token_windows,
  context_len 1) over the text's tokens; each window is a Cloze (its context, then the window's tokens as the one
  choice), the first one conditioned only on the family's prefix ([gMASK] for the blank families).
- generate_until(context, {until, max_gen_toks}): greedy decoding from the family's generation prompt
  (glmkit.evaluation.predict.generate_texts), cut at the first `until` string. Sampling is refused: the harness's
  tasks decode greedily, and glmkit keeps evaluation deterministic.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from collections.abc import Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from glmkit.core.fill import BLANK_RE
from glmkit.core.scoring import cloze_from_ids, encode_cloze, is_blank_infilling, score_clozes
from glmkit.evaluation.predict import generate_texts

BACKEND_NAME = "glmkit"


def _int_or_default(value, default: int) -> int:
    if value is None:
        return default
    text = str(value)
    if text.startswith("auto"):  # lm-eval's "auto" / "auto:N": glmkit picks batches by a logits budget anyway
        return default
    return int(text)


@register_model(BACKEND_NAME)
class GLMKitLM(LM):
    """An lm-eval `LM` over a glmkit model (see the module doc)."""

    def __init__(self, pretrained: str = "glm-tiny", dtype: str | None = None, quantize: str | None = None,
                 device: str | None = None, batch_size: int | str | None = 8, max_batch_size: int | None = None,
                 blank: str = "[gMASK]", max_length: int | None = None, max_gen_toks: int = 256, model=None,
                 tokenizer=None, **unused) -> None:
        super().__init__()
        if unused:
            raise ValueError(f"glmkit backend: unknown model_args {sorted(unused)}; it takes pretrained, dtype, "
                             "quantize, device, batch_size, blank, max_length, max_gen_toks")
        if blank not in ("[gMASK]", "[MASK]", "gMASK", "MASK"):
            raise ValueError(f"blank must be [gMASK] or [MASK], got {blank!r}")
        self.blank = blank if blank.startswith("[") else f"[{blank}]"
        if model is None:
            from glmkit.evaluation.run import load_for_eval

            device = device or "cpu"
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's --device defaults to cuda; on a machine without one, run where the model can
                logging.getLogger(__name__).warning("glmkit backend: no CUDA device here, running on the CPU")
                device = "cpu"
            model, tokenizer = load_for_eval(pretrained, dtype=dtype, quantize=quantize, device=device)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.pretrained = str(pretrained)
        self.batch_size = _int_or_default(batch_size, 8)
        if max_batch_size is not None:
            self.batch_size = min(self.batch_size, int(max_batch_size))
        self.max_length = int(max_length) if max_length else model.config.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        self._device = model.device

    # ---------------------------------------------------------------------------------------- scoring
    def _context_with_blank(self, context: str) -> str:
        if is_blank_infilling(self.model) and not BLANK_RE.search(context):
            return context + self.blank
        return context

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        by_context: dict[str, list[int]] = defaultdict(list)
        for n, req in enumerate(requests):
            by_context[req.args[0]].append(n)
        contexts = list(by_context)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        chunk = self.batch_size * 8
        bar = tqdm(total=len(requests), desc="glmkit loglikelihood", disable=disable_tqdm, file=sys.stderr)
        for at in range(0, len(contexts), chunk):
            part = contexts[at:at + chunk]
            clozes, owners = [], []
            for context in part:
                continuations = [requests[n].args[1] for n in by_context[context]]
                unique = list(dict.fromkeys(continuations))
                clozes.append(encode_cloze(self.model, self.tokenizer, self._context_with_blank(context), unique))
                owners.append((by_context[context], continuations, unique))
            scores = score_clozes(self.model, clozes, batch_size=self.batch_size, max_length=self.max_length)
            for row, (ns, continuations, unique) in zip(scores, owners):
                for n, cont in zip(ns, continuations):
                    s = row[unique.index(cont)]
                    out[n] = (s.logprob, s.greedy)
                    self.cache_hook.add_partial("loglikelihood", requests[n].args, out[n])
                bar.update(len(ns))
        bar.close()
        return out  # type: ignore[return-value]

    def _window_overhead(self) -> int:
        """Tokens a Cloze adds around a window's own tokens (blank, <sop>, [CLS]/<eos>, the causal prefix)."""
        if self.model.config.family == "glm":
            return 4
        if is_blank_infilling(self.model):
            return 2
        return len(self.tokenizer.encode(""))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        window = self.max_length - self._window_overhead()
        if window < 2:
            raise ValueError(f"max_length {self.max_length} leaves no room for rolling windows")
        clozes, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(ids, -1, window, 1)):
                ctx = [t for t in ctx if t != -1]  # -1: lm-eval's prefix slot; the family's own prefix replaces it
                clozes.append(cloze_from_ids(self.model, self.tokenizer, ctx, [pred], blank=self.blank))
                owner.append(n)
        totals = [0.0] * len(requests)
        chunk = self.batch_size * 8
        for at in tqdm(range(0, len(clozes), chunk), desc="glmkit loglikelihood_rolling", disable=disable_tqdm,
                       file=sys.stderr):
            scores = score_clozes(self.model, clozes[at:at + chunk], batch_size=self.batch_size)
            for n, row in zip(owner[at:at + chunk], scores):
                totals[n] += row[0].logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        settings = {}
        for n, req in enumerate(requests):
            kwargs = dict(req.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
                raise ValueError("glmkit's lm-eval backend decodes greedily; the task asks for sampling "
                                 "(do_sample / temperature > 0)")
            key = (tuple(until), max_new)
            groups[key].append(n)
            settings[key] = (until, max_new)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="glmkit generate_until", disable=disable_tqdm, file=sys.stderr)
        for key, ns in groups.items():
            until, max_new = settings[key]
            for at in range(0, len(ns), self.batch_size * 4):
                part = ns[at:at + self.batch_size * 4]
                texts = generate_texts(self.model, self.tokenizer, [requests[n].args[0] for n in part],
                                       max_new_tokens=max_new, blank=self.blank, batch_size=self.batch_size,
                                       max_length=self.max_length, stop=until)
                for n, text in zip(part, texts):
                    out[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
                bar.update(len(part))
        bar.close()
        return out

    @property
    def tokenizer_name(self) -> str:
        return f"glmkit:{self.pretrained}"


def run_harness(argv: Sequence[str]) -> int:
    """`glmkit eval harness ARGS`: lm-eval's command line with the glmkit backend registered (importing this module
    registers it); ARGS are lm-eval's own (`--model glmkit --model_args ... --tasks ...`)."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's --help / usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    finally:
        sys.argv = saved
    return 0
