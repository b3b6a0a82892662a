"""Regenerates tests/data/glm/: tiny checkpoints of the ORIGINAL GLM (THUDM's Hugging Face hub code for glm-large-chinese,
glm-10b-chinese, glm-2b, glm-10b) in the hub's exact layout, written by that code, and golden outputs of that code.
Not run by pytest (the tests read what it writes through tests.helpers.goldens.glm_golden / glm_logits_case).

The hub code (`configuration_glm.py`, `modeling_glm.py`, `tokenization_glm.py`; not kept in this repository, their
sha256 are recorded in golden.json) needs an old transformers:

    python3 -m venv /tmp/glm426
    /tmp/glm426/bin/pip install transformers==4.26.1 sentencepiece tokenizers torch==2.13.0 "numpy<2"
    /tmp/glm426/bin/python tests/data/glm/make_golden.py /path/to/hub_code     # from the repository root

Where the hub files were read from (public copies of the hub repositories, which share these files):
- tokenization_glm.py: github.com/zixiliuUSC/colosssal-glm-demo @ 5561ebc (the hub file without its
  `torch_required` import, which transformers >= 4.27 no longer has; nothing else differs),
- modeling_glm.py / configuration_glm.py: github.com/yuekaizhang/InstructGLM @ 4cb5738 (hub copies; the only edit is
  `from .configuration_glm import` -> `from configuration_glm import`, undone here by importing the folder as a
  package).

What it writes, all with the original classes (GLMChineseTokenizer / GLMGPT2Tokenizer.save_pretrained,
GLMForConditionalGeneration.save_pretrained / GLMModel.save_pretrained):
- chinese/: a SentencePiece BPE `cog-pretrain.model` (nmt_nfkc, user symbol <n>, as the real one) trained here on a
  small corpus, the hub's command tokens after it, and a 2-layer GLM whose weights carry the `glm.` prefix, in one
  pytorch_model.bin;
- gpt2/: a byte-level BPE vocab.json/merges.txt trained here (<|endoftext|> last, as GPT-2), GLM-2B/10B's command
  tokens, and a GLM saved from GLMModel (no `glm.` prefix), sharded (pytorch_model-0000k-of-0000n.bin + index);
- golden.json: tokenizer ids/tokens/decodes for many texts, greedy blank filling through
  build_inputs_for_generation + generate, cloze scores through build_inputs_for_multiple_choice +
  GLMForMultipleChoice, with the inputs of every logits case;
- golden_logits.pt: the logits of those cases (float32): every 7th vocabulary column, and each row's logsumexp
  over the whole vocabulary (which any wrong column would move).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
HUB_FILES = ("configuration_glm.py", "modeling_glm.py", "tokenization_glm.py")
COMMAND_TOKENS_CHINESE = ["<|endoftext|>", "[SEP]", "[CLS]", "[MASK]", "[UNUSED1]", "[UNUSED2]", "<|startofpiece|>",
                          "<|endofpiece|>", "[sMASK]", "[gMASK]"]  # ids N..N+9, as glm-large-chinese numbers them
COMMAND_TOKENS_GPT2 = ["<|startofpiece|>", "<|endofpiece|>", "[CLS]", "[MASK]", "[SEP]", "[UNUSED]", "[gMASK]",
                       "[sMASK]"]  # ids 1 + (N-1)..: THUDM/GLM's GPT2BPETokenizer order (its [UNK] slot unused)

ENGLISH = """The quick brown fox jumps over the lazy dog.
Ng is an adjunct professor at Stanford University, and a pioneer in online education.
Tsinghua University is located in Beijing, the capital of China.
One minus one equals zero, is it correct? Answer: No.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
It was the best of times, it was the worst of times, it was the age of wisdom.
A journey of a thousand miles begins with a single step.
Machine learning models learn patterns from data and make predictions.
The weather today is sunny with a chance of rain in the evening.
Language models predict the next word, and blank infilling models fill the missing spans.
I can't believe it's already 2023! We've got 12 months, 365 days and 8760 hours.
Don't count your chickens before they hatch, they'll surprise you.
Python, C++ and Rust are programming languages; HTML isn't one.
The GLM model was trained with autoregressive blank infilling on large corpora.
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def chinese_corpus() -> str:
    poems = (ROOT / "glmkit" / "assets" / "calibration.txt").read_text(encoding="utf-8")
    return poems[:900] + "\n" + ENGLISH * 3 + "清华大学位于北京。今天天气很好，我们去公园散步吧！\n"


# ------------------------------------------------------------------------------------------------ tokenizers
def train_sentencepiece(out: Path) -> Path:
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(chinese_corpus(), encoding="utf-8")
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(Path(tmp) / "cog-pretrain"),
                                       model_type="bpe", vocab_size=640, character_coverage=0.98,
                                       user_defined_symbols=["<n>"], normalization_rule_name="nmt_nfkc",
                                       num_threads=1, minloglevel=2)
        shutil.copy(Path(tmp) / "cog-pretrain.model", out / "cog-pretrain.model")
    return out / "cog-pretrain.model"


def train_bpe(out: Path) -> tuple[Path, Path]:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([ENGLISH * 4, "清华大学位于北京。"], vocab_size=520, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_model(tmp)
        vocab = json.loads((Path(tmp) / "vocab.json").read_text(encoding="utf-8"))
        merges = (Path(tmp) / "merges.txt").read_text(encoding="utf-8")
    # GPT-2 numbers <|endoftext|> last: move it from 0 to the end, keeping the rest in order
    order = sorted(vocab, key=vocab.get)
    order = [t for t in order if t != "<|endoftext|>"] + ["<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(order)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text(merges, encoding="utf-8")
    return out / "vocab.json", out / "merges.txt"


AUTO_MAP_TOKENIZER = {"GLMChineseTokenizer": ["tokenization_glm.GLMChineseTokenizer", None],
                      "GLMGPT2Tokenizer": ["tokenization_glm.GLMGPT2Tokenizer", None]}
AUTO_MAP_MODEL = {"AutoConfig": "configuration_glm.GLMConfig", "AutoModel": "modeling_glm.GLMModel",
                  "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
                  "AutoModelForMultipleChoice": "modeling_glm.GLMForMultipleChoice",
                  "AutoModelForSequenceClassification": "modeling_glm.GLMForSequenceClassification"}


def add_auto_map(folder: Path, cls_name: str) -> None:
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["auto_map"] = {"AutoTokenizer": AUTO_MAP_TOKENIZER[cls_name]}
    cfg["use_fast"] = False
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_chinese_tokenizer(hub, out: Path):
    vocab = train_sentencepiece(out)
    tok = hub.tokenization_glm.GLMChineseTokenizer(
        str(vocab), eos_token="<|endoftext|>", pad_token="<|endoftext|>", cls_token="[CLS]", mask_token="[MASK]",
        unk_token="[UNK]", sep_token="[SEP]",
        additional_special_tokens=["<|startofpiece|>", "<|endofpiece|>", "[gMASK]", "[sMASK]"])
    tok.add_tokens(COMMAND_TOKENS_CHINESE, special_tokens=True)
    tok.save_pretrained(str(out))
    add_auto_map(out, "GLMChineseTokenizer")


def make_gpt2_tokenizer(hub, out: Path):
    vocab, merges = train_bpe(out)
    tok = hub.tokenization_glm.GLMGPT2Tokenizer(
        str(vocab), str(merges), eos_token="<|endoftext|>", pad_token="<|endoftext|>", cls_token="[CLS]",
        mask_token="[MASK]", unk_token="[UNK]", sep_token="[SEP]",
        additional_special_tokens=["<|startofpiece|>", "<|endofpiece|>", "[gMASK]", "[sMASK]"])
    tok.add_tokens(COMMAND_TOKENS_GPT2, special_tokens=True)
    tok.save_pretrained(str(out))
    add_auto_map(out, "GLMGPT2Tokenizer")


# ------------------------------------------------------------------------------------------------ tokenizer goldens
SPECIALS = ["[MASK]", "[sMASK]", "[gMASK]", "[CLS]", "[SEP]", "<|endoftext|>", "<|startofpiece|>", "<|endofpiece|>",
            "[UNUSED1]", "[UNUSED]"]
TEXTS = [
    "", " ", "  ", "\n", "\t", "a", "A", "hello", "Hello world", " Hello world ", "Hello  world", "Hello\nworld",
    "Hello\n\nworld", "Hello\tworld", "Hello \n world", "  leading and trailing  ", "The quick brown fox jumps.",
    "I can't believe it's 2023!", "Don't stop , please .", "well ... ok ?", "a , b . c ! d ? e", "don 't", "it 's",
    "e-mail: someone@example.com, https://example.com/a?b=c&d=e", "C++ / Rust; x = (y + 3) * 4", "1234567890",
    "3.14159 and 2,718", "$100 € 50 ¥ 20", "Ünïcödé façade naïve café", "ＦＵＬＬ　ｗｉｄｔｈ　１２３", "① ② ③ ⅰ ⅱ",
    "清华大学位于北京。", "今天天气很好，我们去公园散步吧！", "床前明月光，疑是地上霜。", "中文 English 混合 text 123",
    "白日依山盡，黃河入海流。", "「引号」『书名』（括号）【方括号】", "……——～", "emoji 😀 and 👍🏽 here", "𠀀𠀁 rare chars",
    "<n>", "a<n>b", "<unk>", "<s></s>", "tab\there", "x\r\ny", "    four spaces", "multiple   inner    spaces",
    "Tsinghua University is located in [MASK].", "One minus one equals zero, is it correct? Answer: [MASK]",
    "Ng is an adjunct professor at [MASK] (formerly associate professor and Director of its Stanford AI Lab).",
    "清华大学位于[MASK]。", "[MASK]", " [MASK] ", "a[MASK]b", "a [MASK] b", "a  [MASK]  b", "a\n[MASK]\nb",
    "[MASK][MASK]", "[MASK] [sMASK] [gMASK]", "[sMASK]", "x [sMASK] y", "[gMASK]", "text [gMASK]", "[gMASK] text",
    "问题：[MASK]答案：", "[CLS] at start", "a [SEP] b", "end<|endoftext|>", "<|endoftext|> start",
    "a <|endoftext|> b", "a<|endoftext|>b", "<|startofpiece|> x <|endofpiece|>", "[UNUSED1] [UNUSED]",
    "[MASK ] [ MASK] [mask] [Mask]", "[gMASK][sMASK][MASK]", "<|endoftext|><|endoftext|>", "[CLS][SEP]",
    "他说：“[MASK]”，然后离开了。", "The answer is [MASK] .", "new\n[gMASK]\n\nline", "[UNK]", "a [UNK] b",
]


def tokenizer_rows(tok, texts):
    rows = []
    for text in texts:
        try:
            ids = tok(text)["input_ids"]
            row = {"text": text, "ids": ids, "ids_no_special": tok(text, add_special_tokens=False)["input_ids"],
                   "tokens": tok.tokenize(text), "decoded": tok.decode(ids),
                   "decoded_skip": tok.decode(ids, skip_special_tokens=True)}
            if any(i is None for i in ids):
                row = {"text": text, "error": f"token without an id: {ids}"}
        except Exception as e:  # noqa: BLE001 - the original refuses some texts; glmkit must refuse them too
            row = {"text": text, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ models
def hub_model_config(hub, vocab_size: int):
    return hub.configuration_glm.GLMConfig(
        num_layers=2, vocab_size=vocab_size, hidden_size=32, num_attention_heads=4, max_sequence_length=40,
        block_position_encoding=True, output_predict=True, embedding_dropout_prob=0.1, attention_dropout_prob=0.1,
        output_dropout_prob=0.1, checkpoint_activations=False, parallel_output=True, relative_encoding=False,
        attention_scale=1.0, initializer_range=0.02, pool_token="cls")


@torch.no_grad()
def randomize(model, seed: int) -> None:
    """Weights large enough for logits that tell layouts apart (the hub init's 0.02 would give ~0 logits);
    LayerNorm weights and biases away from 1/0 so that a misplaced norm shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "layernorm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif p.dim() == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


FILL_PROMPTS = {
    "chinese": ["清华大学位于[MASK]。", "今天天气很好，[MASK]", "[sMASK]床前明月光，疑是地上霜。", "白日依山尽，[gMASK]",
                "问题：中国的首都是哪里？答案：[MASK]", "他说[MASK]然后[MASK]离开了。"],
    "gpt2": ["Tsinghua University is located in [MASK].", "The quick brown [MASK] jumps over the lazy dog.",
             "One minus one equals zero, is it correct? Answer: [MASK]", "[sMASK] The weather today is sunny.",
             "A journey of a thousand miles [gMASK]", "Machine [MASK] models learn [MASK] from data."],
}
CLOZE = {
    "chinese": [("清华大学位于[MASK]。", ["北京", "上海", "大学", "中国北京"]),
                ("今天天气很[MASK]，我们去公园散步吧！", ["好", "不好", "大"])],
    "gpt2": [("Tsinghua University is located in [MASK].", ["Beijing", " Beijing", " the capital of China", "Paris"]),
             ("One minus one equals zero, is it correct? Answer: [MASK]", [" Yes", " No"])],
}
GEN_LEN = 6
LOGIT_STRIDE = 7  # golden_logits.pt keeps every 7th vocabulary column (and each row's logsumexp), to stay small


def generate_rows(tok, model, prompts):
    rows = []
    for text in prompts:
        inputs = tok.build_inputs_for_generation(tok(text, return_tensors="pt"), max_gen_length=GEN_LEN)
        n = inputs["input_ids"].shape[1]
        out = model.generate(**inputs, max_new_tokens=GEN_LEN, eos_token_id=tok.eop_token_id, do_sample=False)
        new = out[0, n:].tolist()
        answer = new[: new.index(tok.eop_token_id)] if tok.eop_token_id in new else new
        rows.append({"text": text, "input_ids": inputs["input_ids"][0].tolist(), "new_tokens": new,
                     "answer_ids": answer, "answer": tok.decode(answer)})
    # a right-padded batch, as the hub tokenizer pads it
    batch = tok.build_inputs_for_generation(tok(prompts[:2], return_tensors="pt", padding=True),
                                            max_gen_length=GEN_LEN)
    out = model.generate(**batch, max_new_tokens=GEN_LEN, eos_token_id=tok.eop_token_id, do_sample=False)
    n = batch["input_ids"].shape[1]
    batch_rows = [r[n:] for r in out.tolist()]
    return rows, batch_rows


def steer_eop(tok, model, prompts) -> dict:
    """Sets the <|endofpiece|> embedding row so that greedy filling stops after a few tokens on some prompts and
    runs to the limit on others (a random model never says <|endofpiece|>, and the goldens should show where
    generation stops). The row only moves the <|endofpiece|> logit (the token is never fed back), so each prompt's
    unsteered greedy path, with its final hidden states h_t and best other logit m_t, tells exactly where a row e
    stops it: the first t with e·h_t > m_t. The row is a multiple of one of those h_t."""
    glm = model.glm
    eop = tok.eop_token_id
    weight = glm.word_embeddings.weight
    with torch.no_grad():
        weight[eop] = 0.0
    runs = []
    for text in prompts:
        inputs = tok.build_inputs_for_generation(tok(text, return_tensors="pt"), max_gen_length=GEN_LEN)
        ids, n = inputs["input_ids"], inputs["input_ids"].shape[1]
        hs, ms = [], []
        for t in range(GEN_LEN):
            grabbed = []
            handle = glm.transformer.final_layernorm.register_forward_hook(
                lambda m, i, o, into=grabbed: into.append(o[0, -1]))
            with torch.no_grad():
                logits = model(input_ids=ids, position_ids=inputs["position_ids"][..., : n + t],
                               attention_mask=inputs["generation_attention_mask"][..., : n + t, : n + t]).logits[0, -1]
            handle.remove()
            logits[eop] = -float("inf")
            hs.append(grabbed[0])
            ms.append(float(logits.max()))
            ids = torch.cat((ids, logits.argmax().view(1, 1)), dim=1)
        runs.append((torch.stack(hs), torch.tensor(ms)))

    def stops(e):
        return [next((t for t in range(GEN_LEN) if float(hs[t] @ e) > float(ms[t])), GEN_LEN) for hs, ms in runs]

    for p, (hs, _) in enumerate(runs):
        for k in range(1, GEN_LEN):
            direction = hs[k] / hs[k].norm()
            for scale in [x / 4 for x in range(1, 400)]:
                at = stops(scale * direction)
                if sum(1 <= a < GEN_LEN for a in at) >= 2 and sum(a == GEN_LEN for a in at) >= 1 and at.count(0) <= 1:
                    with torch.no_grad():
                        weight[eop] = scale * direction
                    return {"prompt": p, "step": k, "scale": scale, "expected_stops": at}
    raise RuntimeError("no <|endofpiece|> row gives both stopped and unstopped fills")


def logits_cases(tok, model, name, seed):
    """(name, model kwargs) -> the original's logits. Every input is stored so the test can replay it."""
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    cases = {}
    fill = FILL_PROMPTS[name]
    # 1. a right-padded batch laid out for training (build_inputs_for_generation with targets): explicit positions,
    #    a [B, 1, T, T] 0/1 mask with padded key columns
    targets = ["北京", "今天是晴天"] if name == "chinese" else [" Beijing", " fox and the dog"]
    batch = tok.build_inputs_for_generation(tok(fill[:2], return_tensors="pt", padding=True), targets=targets,
                                            max_gen_length=8)
    cases["seq2seq_batch"] = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                  attention_mask=batch["attention_mask"])
    # 2. a blank-filling prompt (context + <|startofpiece|>), the generation mask cut to the prompt
    one = tok.build_inputs_for_generation(tok(fill[3], return_tensors="pt"), max_gen_length=4)
    n = one["input_ids"].shape[1]
    cases["fill_prompt"] = dict(input_ids=one["input_ids"], position_ids=one["position_ids"][..., :n],
                                attention_mask=one["generation_attention_mask"][..., :n, :n])
    # 3. multiple choice, two contexts of different length: the collate pads whole rows, which see nothing
    ctx = [c for c, _ in CLOZE[name]]
    mc = tok.build_inputs_for_multiple_choice(tok(ctx, return_tensors="pt", padding=True),
                                              [ch for _, ch in CLOZE[name]])
    cases["multiple_choice"] = dict(input_ids=mc["input_ids"], position_ids=mc["position_ids"],
                                    attention_mask=mc["attention_mask"])
    # 4. nothing but ids: the hub's defaults (positions 0.., block 0, causal)
    ids = torch.randint(0, V, (2, 9), generator=g)
    cases["default"] = dict(input_ids=ids)
    # 5. positions without a mask (causal), block positions included
    pos = torch.stack((torch.tensor([0, 1, 2, 3, 4, 5, 3, 3, 3]), torch.tensor([0, 0, 0, 0, 0, 0, 1, 2, 3])))
    cases["positions_only"] = dict(input_ids=ids, position_ids=pos[None].expand(2, -1, -1).contiguous())
    # 6. GLM's own `sep` form: one int per row
    cases["sep"] = dict(input_ids=ids, position_ids=pos[None].expand(2, -1, -1).contiguous(),
                        attention_mask=torch.tensor([6, 4]))
    # 7. a [B, T] 0/1 mask: the hub reads it as a key mask for every row (no causality)
    key = torch.ones(2, 9, dtype=torch.long)
    key[1, 6:] = 0
    cases["key_mask_2d"] = dict(input_ids=ids, attention_mask=key)
    out = {}
    with torch.no_grad():
        for case, kwargs in cases.items():
            out[case] = (kwargs, model(**kwargs).logits.float())
    return out


def build(hub_dir: Path) -> None:
    import types

    from transformers import AutoModelForMultipleChoice, AutoModelForSeq2SeqLM, AutoTokenizer

    pkg_root = Path(tempfile.mkdtemp())
    (pkg_root / "glm_hub").mkdir()
    for f in HUB_FILES:
        shutil.copy(hub_dir / f, pkg_root / "glm_hub" / f)
    (pkg_root / "glm_hub" / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg_root))
    hub = types.SimpleNamespace(**{m: importlib.import_module(f"glm_hub.{m}")
                                   for m in ("configuration_glm", "modeling_glm", "tokenization_glm")})
    golden = {"about": "Outputs of THUDM's original GLM hub code (configuration_glm.py, modeling_glm.py, "
                       "tokenization_glm.py) on the tiny checkpoints in this folder, which that code wrote. "
                       "Regenerate with tests/data/glm/make_golden.py (see its docstring).",
              "transformers": importlib.import_module("transformers").__version__, "torch": torch.__version__,
              "hub_code_sha256": {f: sha256(hub_dir / f) for f in HUB_FILES}, "fixtures": {}}
    logits = {}
    for name, make_tok, seed in (("chinese", make_chinese_tokenizer, 1), ("gpt2", make_gpt2_tokenizer, 2)):
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        make_tok(hub, out)
        # load everything back the way users do, through the hub code in a scratch copy of the folder
        work = Path(tempfile.mkdtemp()) / name
        shutil.copytree(out, work)
        for f in HUB_FILES:
            shutil.copy(hub_dir / f, work / f)
        tok = AutoTokenizer.from_pretrained(str(work), trust_remote_code=True)
        torch.manual_seed(seed)
        model = hub.modeling_glm.GLMForConditionalGeneration(hub_model_config(hub, len(tok)))
        randomize(model, seed)
        model.eval()
        strength = steer_eop(tok, model, FILL_PROMPTS[name])
        if name == "chinese":  # GLMForConditionalGeneration's names (glm. prefix), one file
            model.save_pretrained(str(out), max_shard_size="10GB")
        else:  # GLMModel's names, sharded
            model.glm.save_pretrained(str(out), max_shard_size="40KB")
        for f in out.glob("config.json"):
            cfg = json.loads(f.read_text(encoding="utf-8"))
            cfg["auto_map"] = AUTO_MAP_MODEL
            cfg["architectures"] = ["GLMForConditionalGeneration"] if name == "chinese" else ["GLMModel"]
            f.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        for f in out.iterdir():
            if f.suffix in (".bin", ".json", ".model", ".txt"):
                shutil.copy(f, work / f.name)
        model = AutoModelForSeq2SeqLM.from_pretrained(str(work), trust_remote_code=True).eval()
        mc_model = AutoModelForMultipleChoice.from_pretrained(str(work), trust_remote_code=True).eval()

        fixture = {"eop_row": strength, "files": sorted(p.name for p in out.iterdir()),
                   "special_ids": {k: getattr(tok, k) for k in (
                       "cls_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "sep_token_id",
                       "unk_token_id", "sop_token_id", "eop_token_id", "gmask_token_id", "smask_token_id")},
                   "len": len(tok), "tokenizer": tokenizer_rows(tok, TEXTS)}
        fixture["fill"], fixture["fill_batch"] = generate_rows(tok, model, FILL_PROMPTS[name])
        with torch.no_grad():
            cloze = []
            for context, choices in CLOZE[name]:
                inputs = tok.build_inputs_for_multiple_choice(tok([context], return_tensors="pt"), [choices])
                scores = mc_model(**inputs).logits[0].tolist()
                cloze.append({"context": context, "choices": choices, "scores": scores})
            fixture["cloze"] = cloze
        cases = logits_cases(tok, model, name, seed)
        fixture["logits_cases"] = {}
        for case, (kwargs, value) in cases.items():
            fixture["logits_cases"][case] = {k: v.tolist() for k, v in kwargs.items()}
            logits[f"{name}/{case}/columns"] = value[..., ::LOGIT_STRIDE].contiguous()
            logits[f"{name}/{case}/logsumexp"] = value.logsumexp(-1).contiguous()
        golden["fixtures"][name] = fixture
    (HERE / "golden.json").write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    torch.save(logits, HERE / "golden_logits.pt")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} HUB_CODE_FOLDER  (holding {', '.join(HUB_FILES)})")
    build(Path(sys.argv[1]))
