"""Regenerates tests/data/special_tokens/golden.json: the ids the ORIGINAL GLM tokenizers give for texts that hold
special-token strings. Not run by pytest (tests/test_tokenizer.py only reads golden.json).

The originals need old transformers versions, each in its own virtual environment (Python 3.11):

    python3 -m venv /tmp/t427 && /tmp/t427/bin/pip install transformers==4.27.1 sentencepiece torch
    python3 -m venv /tmp/t430 && /tmp/t430/bin/pip install transformers==4.30.2 sentencepiece torch
    python3 -m venv /tmp/t440 && /tmp/t440/bin/pip install transformers==4.40.2 sentencepiece tiktoken torch

(torch only because the ChatGLM2 file imports it) and the families' original `tokenization_chatglm.py` files (not
kept in this repository; their sha256 is recorded in golden.json). Where they were read from:

- ChatGLM-6B: THUDM/chatglm-6b (Hugging Face) at 4d0fc39 "Update decode method in tokenizer" (2023-05-08, the last
  change of the file), mirrored with its history in github.com/greensheng/chatglm-6b.
- ChatGLM2-6B: THUDM/chatglm2-6b `tokenization_chatglm.py`, the copy in github.com/bq-xiao/chatglm2-6b-model at
  1fd8e8d ("init"; `_pad` already takes `padding_side`, i.e. a late revision). `_tokenize` / `convert_token_to_id`
  read the same in the earlier (June/July 2023) revisions seen.
- ChatGLM3-6B: THUDM/chatglm3-6b at 456aa87 "fix piece id out of range" (2023-12-07), mirrored with its history in
  github.com/czk1997/chatglm3-copy.
- GLM-4: a glm-4-9b-chat `ChatGLM4Tokenizer` (tiktoken ranks; its special tokens registered in tiktoken and encoded
  with `disallowed_special=()`; its tokenizing methods transcribed from a public copy, chat/padding methods left out);
  with `added_tokens_decoder` in tokenizer_config.json transformers splits the
  special tokens out before `_tokenize` is called, so the revisions that leave tiktoken without special tokens give
  the same ids.

Steps (from the repository root):

    .venv/bin/python tests/data/special_tokens/make_golden.py build     # only to re-create the tokenizer folders
    python3 tests/data/special_tokens/make_golden.py generate \\
        --py427 /tmp/t427/bin/python --py430 /tmp/t430/bin/python --py440 /tmp/t440/bin/python \\
        --chatglm6b-src chatglm-6b/tokenization_chatglm.py --chatglm2-src chatglm2-6b/tokenization_chatglm.py \\
        --chatglm3-src chatglm3-6b/tokenization_chatglm.py --glm4-src glm-4-9b-chat/tokenization_chatglm.py \\
        [--glm4-alt-src other-glm-4-revision/tokenization_chatglm.py]

`generate` loads every case folder with `AutoTokenizer.from_pretrained(folder, trust_remote_code=True)` (the
original file copied in as tokenization_chatglm.py), as a user of the published checkpoints does, and records
`encode(text)`, `tokenize(text)` (SentencePiece families) and `decode(encode(text))` for every text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

CHATGLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<unk>", "<pad>", "</s>", "<s>", "<n>",
                    "<|tab|>", "<|blank_3|>", "<ENC>", "<dBLOCK>", "<unused_0>", "<image_7>", "sop", "<|user|>"]
CHATGLM2_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<sop>", "<eop>", "<unk>", "<s>", "</s>",
                     "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>", "sop", "</s>", "<|user", "[MASK"]

# {t} is the special-token string; start, middle and end of text, with and without whitespace around it.
TEMPLATES = ["{t}", "{t} in text", "{t}in text", "text {t}", "text{t}", "a {t} b", "a{t}b", "a  {t}  b",
             "a\t{t}\tb", "a\n{t}\nb", " {t} ", "  {t}", "{t}  ", "\n{t}", "{t}\n", "a \u3000{t}\u3000 b",
             "你好{t}世界", "你好 {t} 世界", "{t}{t}", "{t} {t}", "x {t}\n\ny"]
EXTRA_TEXTS = ["[MASK] in text", "x [MASK] y", "Hello [MASK] world [gMASK] end <sop>", "[gMASK]<sop>",
               "[gMASK] <sop> text", "<sop><eop>", "[MASK]   \t\n  [sMASK]", "床前明月[MASK]，疑是地上霜。",
               "白日依山盡，[sMASK]", "<|user|>\n你好<|assistant|>", "<|system|> You are [MASK] <|user|> hi ",
               "[gMASK]sop<|user|>\n 你好<|assistant|>", "  ", "", "plain text, no special token",
               "code:\n    [MASK]\n\treturn 0", "<pad><pad> x <unk>", "a</s>b </s> c", "[[MASK]]", "<<sop>>",
               "[MASK][gMASK][sMASK]", "end with space [MASK] ", "\u00a0[MASK]\u00a0x", "Hello <SOP> World",
               "[mask] In TEXT", "<EOP>", "ABC  [MASK]   DEF  G\n", "<|USER|> Hi [GMASK]"]


def texts_for(specials: list[str]) -> list[str]:
    out: list[str] = []
    for t in specials:
        out.extend(tpl.format(t=t) for tpl in TEMPLATES)
    out.extend(EXTRA_TEXTS)
    seen: set[str] = set()
    return [t for t in out if not (t in seen or seen.add(t))]


# name -> (family file key, transformers python key, folder, specials to put in texts)
CASES = {
    "chatglm": ("chatglm6b", "py427", "chatglm", CHATGLM_SPECIALS),
    "chatglm_userdef": ("chatglm6b", "py427", "chatglm_userdef", CHATGLM_SPECIALS),
    "chatglm_lower": ("chatglm6b", "py427", "chatglm_lower", CHATGLM_SPECIALS),
    "glm_tiny": ("chatglm6b", "py427", str(REPO / "glmkit" / "assets" / "glm-tiny"), CHATGLM_SPECIALS),
    "chatglm2": ("chatglm2", "py430", "chatglm2", CHATGLM2_SPECIALS),
    "chatglm2_pieces": ("chatglm2", "py430", "chatglm2_pieces", CHATGLM2_SPECIALS),
    "chatglm3": ("chatglm3", "py430", "chatglm3", CHATGLM2_SPECIALS),
    "chatglm3_pieces": ("chatglm3", "py430", "chatglm3_pieces", CHATGLM2_SPECIALS),
    "glm4": ("glm4", "py440", "glm4", GLM4_SPECIALS),
    "glm4_strip": ("glm4", "py440", "glm4_strip", GLM4_SPECIALS),
}
# Cross-checks (not stored): the same case under another transformers version, or with another revision of the
# family's file, must give the same ids.
CROSS_CHECKS = [("chatglm3", "py440", "chatglm3"), ("chatglm3_pieces", "py440", "chatglm3"),
                ("chatglm2", "py440", "chatglm2"), ("glm4", "py440", "glm4_alt"), ("glm4_strip", "py440", "glm4_alt")]
# Which cases also keep tokenize() and decode() of the original (ids are kept for all).
STORE = {"tokens": {"chatglm", "chatglm_userdef", "chatglm_lower", "chatglm2", "chatglm3_pieces"},
         "decoded": {"chatglm", "chatglm_userdef", "glm_tiny", "chatglm2", "chatglm2_pieces"}}
VERSIONS = {"py427": "transformers==4.27.1", "py430": "transformers==4.30.2", "py440": "transformers==4.40.2"}
SOURCES = {
    "chatglm6b": "THUDM/chatglm-6b tokenization_chatglm.py @ 4d0fc39 (2023-05-08; github.com/greensheng/chatglm-6b)",
    "chatglm2": "THUDM/chatglm2-6b tokenization_chatglm.py (copy in github.com/bq-xiao/chatglm2-6b-model @ 1fd8e8d)",
    "chatglm3": "THUDM/chatglm3-6b tokenization_chatglm.py @ 456aa87 (2023-12-07; github.com/czk1997/chatglm3-copy)",
    "glm4": "glm-4-9b-chat ChatGLM4Tokenizer tokenization_chatglm.py, the revision that registers the special "
            "tokens in tiktoken and encodes with disallowed_special=() (tokenizing methods transcribed verbatim; chat "
            "and padding methods left out)",
    "glm4_alt": "the same with tiktoken given no special tokens and _tokenize = tiktoken encode(text) (the glm-4v-9b "
                "/ earlier glm-4-9b-chat revisions)",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------ build

def build() -> None:
    """Writes the case folders (run with glmkit's interpreter from the repository root)."""
    sys.path.insert(0, str(REPO))
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tests.test_tokenizer import CORPUS_LINES, _corpus, _train_byte_bpe

    from glmkit.core.tokenizer import write_tiktoken_ranks
    from glmkit.core.tokenizer.base import CHATGLM_SPECIAL_PIECES, GLM4_SPECIAL_TOKENS
    from glmkit.training.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = _corpus(Path(tmp) / "train.jsonl")
        for name in ("chatglm", "chatglm2", "chatglm3"):
            shutil.rmtree(HERE / name, ignore_errors=True)
        train_tokenizer([corpus], 700, "chatglm", HERE / "chatglm", seed=0)
        train_tokenizer([corpus], 600, "chatglm2", HERE / "chatglm2", seed=0)
        train_tokenizer([corpus], 600, "chatglm3", HERE / "chatglm3", model_type="unigram", seed=0)

    # ChatGLM-6B layout whose special pieces are USER_DEFINED (SentencePiece then matches them inside text).
    proto = pb.ModelProto()
    proto.ParseFromString((HERE / "chatglm" / "ice_text.model").read_bytes())
    for p in proto.pieces:
        if p.piece in CHATGLM_SPECIAL_PIECES:
            p.type = pb.ModelProto.SentencePiece.USER_DEFINED
    out = HERE / "chatglm_userdef"
    out.mkdir(exist_ok=True)
    (out / "ice_text.model").write_bytes(proto.SerializeToString())
    shutil.copyfile(HERE / "chatglm" / "tokenizer_config.json", out / "tokenizer_config.json")

    # The same model with do_lower_case and remove_space set (both act on the text around the special tokens).
    out = HERE / "chatglm_lower"
    out.mkdir(exist_ok=True)
    shutil.copyfile(HERE / "chatglm" / "ice_text.model", out / "ice_text.model")
    cfg = json.loads((HERE / "chatglm" / "tokenizer_config.json").read_text())
    cfg.update(do_lower_case=True, remove_space=True)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")

    # A unigram model holding pieces spelled like ChatGLM2/3 command tokens: the original maps such a piece to the
    # command id (`convert_token_to_id` looks the piece up in its special tokens first).
    proto = pb.ModelProto()
    proto.ParseFromString((HERE / "chatglm3" / "tokenizer.model").read_bytes())
    for piece in ("sop", "eop", "[MASK]", "<|user|>", "▁sop"):
        proto.pieces.append(pb.ModelProto.SentencePiece(piece=piece, score=0.0,
                                                        type=pb.ModelProto.SentencePiece.NORMAL))
    for name, family in (("chatglm2_pieces", "chatglm2"), ("chatglm3_pieces", "chatglm3")):
        out = HERE / name
        out.mkdir(exist_ok=True)
        (out / "tokenizer.model").write_bytes(proto.SerializeToString())
        cfg = json.loads((HERE / "chatglm3" / "tokenizer_config.json").read_text())
        cfg["glmkit_family"] = family
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")

    # GLM-4: the byte-level BPE tests/test_tokenizer.py trains, special tokens after the ranks (config as glmkit
    # writes it, i.e. the published added_tokens_decoder layout).
    ranks = _train_byte_bpe(CORPUS_LINES * 3, 300)
    n = len(ranks)
    for name, flags in (("glm4", {}), ("glm4_strip", {"<|user|>": {"rstrip": True}, "<|assistant|>": {"lstrip": True},
                                                      "[sMASK]": {"lstrip": True, "rstrip": True},
                                                      "<eop>": {"single_word": True}})):
        out = HERE / name
        out.mkdir(exist_ok=True)
        write_tiktoken_ranks(ranks, out / "tokenizer.model")
        decoder = {}
        for i, t in enumerate(GLM4_SPECIAL_TOKENS):
            entry = {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            entry.update(flags.get(t, {}))
            decoder[str(n + i)] = entry
        cfg = {"added_tokens_decoder": decoder,
               "additional_special_tokens": [t for t in GLM4_SPECIAL_TOKENS if t.startswith("<|")
                                             and t != "<|endoftext|>"],
               "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
               "clean_up_tokenization_spaces": False, "do_lower_case": False, "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "padding_side": "left", "remove_space": False,
               "tokenizer_class": "ChatGLM4Tokenizer"}
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")
    print("built", ", ".join(sorted(p.name for p in HERE.iterdir() if p.is_dir())))


# ------------------------------------------------------------------------------------------------------ worker

def worker(folder: str, src: str, texts_file: str) -> None:
    """Runs inside an old-transformers environment; prints {"ids": ..., "tokens": ..., "decoded": ...} as JSON."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers
    from transformers import AutoTokenizer

    texts = json.loads(Path(texts_file).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        for f in Path(folder).iterdir():
            if f.name in ("tokenizer_config.json", "ice_text.model", "tokenizer.model"):
                shutil.copyfile(f, Path(tmp) / f.name)
        shutil.copyfile(src, Path(tmp) / "tokenization_chatglm.py")
        tok = AutoTokenizer.from_pretrained(tmp, trust_remote_code=True)
        ids, tokens, decoded = [], [], []
        for text in texts:
            row = tok.encode(text)
            ids.append(row)
            toks = tok.tokenize(text)
            tokens.append(None if any(isinstance(t, bytes) for t in toks) else toks)
            decoded.append(tok.decode(row))
    json.dump({"transformers": transformers.__version__, "class": type(tok).__name__, "ids": ids, "tokens": tokens,
               "decoded": decoded}, sys.stdout, ensure_ascii=False)


def run_worker(python: str, folder: Path, src: Path, texts: list[str]) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump(texts, f, ensure_ascii=False)
    try:
        out = subprocess.run([python, str(Path(__file__).resolve()), "worker", str(folder), str(src), f.name],
                             check=True, capture_output=True, text=True, cwd=tempfile.gettempdir())
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout)


def generate(args: argparse.Namespace) -> None:
    srcs = {"chatglm6b": Path(args.chatglm6b_src), "chatglm2": Path(args.chatglm2_src),
            "chatglm3": Path(args.chatglm3_src), "glm4": Path(args.glm4_src)}
    if args.glm4_alt_src:
        srcs["glm4_alt"] = Path(args.glm4_alt_src)
    pythons = {"py427": args.py427, "py430": args.py430, "py440": args.py440}
    cases = {}
    for name, (fam, py, folder, specials) in CASES.items():
        folder_path = Path(folder) if os.path.isabs(folder) else HERE / folder
        texts = texts_for(specials)
        res = run_worker(pythons[py], folder_path, srcs[fam], texts)
        model = next(p for p in folder_path.iterdir() if p.name in ("ice_text.model", "tokenizer.model"))
        fields = ["text", "ids"] + [f for f in ("tokens", "decoded") if name in STORE[f]]
        columns = {"text": texts, "ids": res["ids"], "tokens": res["tokens"], "decoded": res["decoded"]}
        cases[name] = {
            "folder": os.path.relpath(folder_path, REPO), "model_sha256": sha256(model),
            "config_sha256": sha256(folder_path / "tokenizer_config.json"),
            "original": SOURCES[fam], "original_sha256": sha256(srcs[fam]),
            "transformers": res["transformers"], "class": res["class"], "fields": fields,
            "rows": [list(row) for row in zip(*(columns[f] for f in fields))],
        }
        print(f"{name}: {len(texts)} texts with {res['class']} under transformers {res['transformers']}")
    for name, py, src in CROSS_CHECKS:
        if src not in srcs:
            continue
        _, _, folder, specials = CASES[name]
        res = run_worker(pythons[py], HERE / folder, srcs[src], texts_for(specials))
        if res["ids"] != [row[1] for row in cases[name]["rows"]]:
            raise SystemExit(f"{name}: {src} under transformers {res['transformers']} gives other ids")
        cases[name].setdefault("also_checked_with", []).append(
            f"{SOURCES[src]} (sha256 {sha256(srcs[src])}) under transformers {res['transformers']}: same ids")
        print(f"{name}: same ids with {src} under transformers {res['transformers']}")
    write_golden({
        "about": "Ids of the ORIGINAL tokenization_chatglm.py of each GLM family, loaded with "
                 "AutoTokenizer.from_pretrained(folder, trust_remote_code=True) under the transformers version each "
                 "family ran with. A row is `fields` of one text: ids = encode(text) (the family's special tokens "
                 "added), tokens = tokenize(text), decoded = decode(ids). Regenerate with "
                 "tests/data/special_tokens/make_golden.py (see its docstring); glmkit's tests only read this file.",
        "transformers_versions": VERSIONS,
        "cases": cases,
    })


def write_golden(golden: dict) -> None:
    """One row per line, so that a text sits next to its ids and diffs stay readable."""
    def dump(v: object) -> str:
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))

    lines = ["{"]
    for key in ("about", "transformers_versions"):
        lines.append(f" {dump(key)}:{dump(golden[key])},")
    lines.append(' "cases":{')
    names = list(golden["cases"])
    for n, name in enumerate(names):
        case = dict(golden["cases"][name])
        rows = case.pop("rows")
        lines.append(f"  {dump(name)}:{{")
        lines.extend(f"   {dump(k)}:{dump(v)}," for k, v in case.items())
        lines.append('   "rows":[')
        lines.extend(f"    {dump(r)}{',' if i < len(rows) - 1 else ''}" for i, r in enumerate(rows))
        lines.append("   ]")
        lines.append("  }" + ("," if n < len(names) - 1 else ""))
    lines.append(" }")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == json.loads(dump(golden))
    (HERE / "golden.json").write_text(text, encoding="utf-8")
    print("wrote", HERE / "golden.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    w = sub.add_parser("worker")
    w.add_argument("folder")
    w.add_argument("src")
    w.add_argument("texts")
    g = sub.add_parser("generate")
    for k in ("py427", "py430", "py440", "chatglm6b_src", "chatglm2_src", "chatglm3_src", "glm4_src"):
        g.add_argument("--" + k.replace("_", "-"), required=True)
    g.add_argument("--glm4-alt-src", help="another revision of the GLM-4 file, for a cross-check")
    args = ap.parse_args()
    if args.cmd == "build":
        build()
    elif args.cmd == "worker":
        worker(args.folder, args.src, args.texts)
    else:
        generate(args)


if __name__ == "__main__":
    main()
