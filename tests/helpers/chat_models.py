"""Tiny chat models with their own tokenizers (serving, evaluation and chat tests), the scripted model of the tool
tests, and the tiny model / forced-answer processor of the chat tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from glmkit.core.causal_lm import GLMForCausalLM
from glmkit.core.config import GLMConfig
from tests.helpers.common import REPO


# A small bilingual corpus for tokenizer-backed tests (fill, eval, data).
POEMS = ["床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。", "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。",
         "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little.",
         "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。"]


def tiny_chatglm_with_tokenizer(root: Path, std: float, seed: int):
    """A random tiny ChatGLM-6B-layout model with a tokenizer trained on POEMS, saved to root/model and loaded back
    through glmkit's own loader. Returns (model, tokenizer, model folder)."""
    from glmkit.core.config import GLMConfig
    from glmkit.core.model import GLM
    from glmkit.core.tokenizer import load_tokenizer
    from glmkit.loading.loader import load_model, save_model
    from glmkit.training.tokenizer import train_tokenizer

    rows = [f"{p}（{i}）" for i in range(40) for p in POEMS]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows),
                                  encoding="utf-8")
    tok = train_tokenizer([root / "c.jsonl"], 480, "chatglm", root / "tok")
    config = GLMConfig.from_name("chatglm-6b", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2,
                                 ffn_hidden_size=64, max_seq_len=256, bos_token_id=tok.sop_token_id,
                                 eos_token_id=tok.eop_token_id, pad_token_id=tok.pad_token_id,
                                 mask_token_id=tok.mask_token_id, gmask_token_id=tok.gmask_token_id,
                                 torch_dtype="float32")
    model = GLM(config)
    model.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    save_model(model, root / "model", tokenizer=tok)
    return load_model(root / "model", dtype="float32").eval(), load_tokenizer(root / "model"), root / "model"


# A tiny random chat model with its own tokenizer, for the serving tests (terminal, HTTP, browser).
WORDS = ("the a cat dog runs fast slow model answer question hello world river stone light "
         "你好 世界 模型 回答 问题 我们 今天 天气 很好 , . ? !").split()


def build_tiny_chat_model(out: Path, family: str = "chatglm3", *, endless: bool = False, max_seq_len: int = 512,
                          std: float = 0.3, seed: int = 0) -> Path:
    """Writes a tiny random GLM checkpoint with a freshly trained tokenizer to `out`; returns `out`.

    std: weight init scale; 0.3 (not the usual 0.02) makes a random model's answer depend visibly on its prompt.
    endless=True zeroes the output rows of every special token and of every token that does not decode to visible
    text (newlines, blanks, bytes), so greedy decoding never stops early and answers are one readable line: the
    other logits (std ~1.7 here) are never all below 0. Answers then run to the length limit, long enough to
    interrupt.
    """
    from glmkit.core.causal_lm import GLMForCausalLM
    from glmkit.core.config import GLMConfig
    from glmkit.loading.loader import save_model
    from glmkit.training.tokenizer import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    corpus = out.parent / f"{out.name}-corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)),
                      encoding="utf-8")
    tok = train_tokenizer([corpus], 600 if family == "chatglm" else 512, family, out)
    overrides = dict(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64,
                     max_seq_len=max_seq_len, torch_dtype="float32", eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    if family == "chatglm":
        overrides.update(bos_token_id=tok.bos_token_id, mask_token_id=tok.get_command("[MASK]"),
                         gmask_token_id=tok.get_command("[gMASK]"))
        preset = "chatglm-6b"
    else:
        overrides.update(num_kv_heads=2, head_dim=8)
        preset = "chatglm3-6b" if family == "chatglm3" else "chatglm2-6b"
    config = GLMConfig.from_name(preset, **overrides)
    torch.manual_seed(seed)
    model = GLMForCausalLM(config)
    model.init_weights(std=std)
    if endless:
        with torch.no_grad():
            for i in range(config.vocab_size):
                text = tok.decode([i])
                if i in tok.special_token_ids or not text.strip() or not text.isprintable() or "\ufffd" in text:
                    model.lm_head.weight[i] = 0
    save_model(model, out, tokenizer=tok)
    return out


# Tool calling: a tiny GLM-4 checkpoint (its tokenizer in glm-4-9b-chat's layout, chat template included), and a
# model whose answers are scripted below the serving engine (the HTTP, parsing and streaming layers stay real).
TOOL_DATA = REPO / "tests" / "data" / "tool_calls"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SEARCH_TOOL = {"type": "function", "function": {
    "name": "search_docs", "description": "Search the docs",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}


def build_tiny_glm4_model(out: Path, *, max_seq_len: int = 2048, std: float = 0.3, seed: int = 0) -> Path:
    """A tiny random GLM-4 checkpoint with the tokenizer of tests/data/tool_calls/glm4 (556 byte-level ranks plus
    GLM-4's special tokens, glm-4-9b-chat's chat template); returns `out`."""
    from glmkit.core.causal_lm import GLMForCausalLM
    from glmkit.core.config import GLMConfig
    from glmkit.core.tokenizer import load_tokenizer
    from glmkit.loading.loader import save_model

    tok = load_tokenizer(TOOL_DATA / "glm4")
    stops = [tok.eos_token_id, tok.get_command("<|user|>"), tok.get_command("<|observation|>")]
    config = GLMConfig.from_name("glm-4-9b-chat", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=8, ffn_hidden_size=64, max_seq_len=max_seq_len,
                                 torch_dtype="float32", eos_token_id=stops, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = GLMForCausalLM(config)
    model.init_weights(std=std)
    save_model(model, out, tokenizer=tok)
    return out


STORY = "Once upon a time a small cat watched the sun rise over the river, and the day was long and warm."


def tool_script(family: str, prompt: str) -> tuple[str, str] | None:
    """The scripted answer (text, stop token) to a chat prompt, or None for the model's own. The last turn decides:
    a tool result gets a sentence about it, a weather question with the tools offered gets a get_weather call (in
    the family's own call format), "story" gets STORY, "echo: X" gets X."""
    from glmkit.core.tools import chatglm3_call_content

    last = max(prompt.rfind("<|user|>"), prompt.rfind("<|observation|>"))
    turn = prompt[last:]
    if turn.startswith("<|observation|>"):
        return "\nThe weather in Paris is sunny.", "<|user|>"
    if "weather" in turn and "get_weather" in prompt[:last]:
        args = {"city": "Paris"}
        body = json.dumps(args) if family == "glm4" else chatglm3_call_content(args)
        return f"get_weather\n{body}", "<|observation|>"
    if "story" in turn:
        return "\n" + STORY, "<|user|>"
    if "echo:" in turn:
        return "\n" + turn.split("echo:", 1)[1].split("<|assistant|>")[0].strip(), "<|user|>"
    return None


def scripted_model(folder: Path):
    """(model, tokenizer): the checkpoint in `folder` as a ScriptedChatModel answering by tool_script."""
    from glmkit.core.causal_lm import GLMForCausalLM
    from glmkit.core.paged_cache import PagedLayerCache
    from glmkit.core.tokenizer import load_tokenizer
    from glmkit.loading.loader import load_model

    class ScriptedChatModel(GLMForCausalLM):
        """The real forward pass, then each row's next token forced to its scripted answer (if it has one).

        The script reads each row's whole text, prompt and answer so far, which the model remembers as its KV cache
        does: the token written to every cache slot (a paged cache's slots, or a contiguous cache's (row,
        position)); the attention mask says which slots a row reads. So it answers the same under model.chat and
        under the serving engine, whatever rows share a forward."""

        def forward(self, input_ids, position_ids=None, attention_mask=None, input_pos=None, **kwargs):
            logits = super().forward(input_ids, position_ids, attention_mask, input_pos=input_pos, **kwargs)
            logits = logits.clone()
            for row, tokens in enumerate(self._rows(input_ids, attention_mask, input_pos)):
                assistant = tok.get_command("<|assistant|>")
                if assistant not in tokens:
                    continue
                cut = len(tokens) - tokens[::-1].index(assistant)  # the prompt ends at the last <|assistant|>
                answer = tool_script(tok.family, tok.decode(tokens[:cut]))
                if answer is None:
                    continue
                target = tok.sp_encode(answer[0]) + [tok.get_command(answer[1])]
                step = len(tokens) - cut
                if step < len(target):
                    logits[row, -1] = -1e4
                    logits[row, -1, target[step]] = 1e4
            return logits

        def _rows(self, input_ids, attention_mask, input_pos):
            """Each row's tokens so far (those its last position attends to)."""
            cache = self.h[0].attn.kv_cache
            if cache is None:
                return [[t for t in row if t != self.config.pad_token_id] for row in input_ids.tolist()]
            memory = self.__dict__.setdefault("slot_tokens", {})  # cache slot -> the token written there
            B, T = input_ids.shape
            if isinstance(cache, PagedLayerCache):
                write, read = cache.pool.write.view(B, T).tolist(), cache.pool.read.tolist()
            else:
                write = [[(b, int(p)) for p in input_pos] for b in range(B)]
                read = [[(b, p) for p in range(int(input_pos[-1]) + 1)] for b in range(B)]
            for b in range(B):
                memory.update(zip(write[b], input_ids[b].tolist()))
            seen = attention_mask[:, 0, -1] if attention_mask.dim() == 4 else attention_mask[:, -1]
            seen = seen.expand(B, -1).tolist()
            return [[memory[slot] for slot, ok in zip(read[b], seen[b]) if ok] for b in range(B)]

    tok = load_tokenizer(folder)
    base = load_model(folder, dtype="float32")
    model = ScriptedChatModel(base.config)
    model.load_state_dict(base.state_dict())
    return model.eval(), tok


def serve_scripted(folder: str, port: int) -> None:
    """`glmkit serve`'s library call (glmkit.serving.openai_api.serve) on the scripted model: run as a process."""
    from glmkit.serving.openai_api import serve

    model, tok = scripted_model(Path(folder))
    serve(model, tok, "tiny-tools", port=port, log_level="warning")


def tiny_model(tok, seed: int = 0, max_seq_len: int = 256) -> GLMForCausalLM:
    if tok.family == "chatglm":
        cfg = GLMConfig(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64,
                        max_seq_len=max_seq_len, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id,
                        gmask_token_id=tok.gmask_token_id, family="chatglm")
    else:
        cfg = GLMConfig(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                        ffn_hidden_size=48, max_seq_len=max_seq_len, norm="rmsnorm", residual="prenorm", mlp="swiglu",
                        qkv_bias=True, proj_bias=False, mlp_bias=False, qkv_layout="grouped", rope="half_interleaved",
                        attention="causal", bos_token_id=None, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, mask_token_id=None, gmask_token_id=None,
                        family="glm4" if tok.family == "glm4" else "chatglm2")
    torch.manual_seed(seed)
    model = GLMForCausalLM(cfg)
    model.init_weights(std=0.5, generator=torch.Generator().manual_seed(seed))
    return model.eval()


class Script:
    """A logits processor (the public `logits_processor` argument) that forces a fixed token sequence."""

    def __init__(self, ids: list[int]):
        self.ids, self.i = ids, 0

    def __call__(self, input_ids, scores):
        scores = torch.full_like(scores, -1e4)
        scores[:, self.ids[min(self.i, len(self.ids) - 1)]] = 1e4
        self.i += 1
        return scores
