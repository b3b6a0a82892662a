"""Shared fixtures: tiny THUDM-layout checkpoints written by hand (key names spelled out, not taken from glmkit)."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of `a` against the reference `b`."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def free_port() -> int:
    """A TCP port free on loopback right now (servers and torchrun rendezvous in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[1]


class ServerProcess:
    """A server in its own process (argv run from the repository root) on a free loopback port, with its log
    (log_dir/NAME-PORT.log) kept for failure messages; ready once GET `ready_path` answers 200. The port is picked
    first: the command line is `argv(port)`."""

    def __init__(self, argv, log_dir: Path, *, name: str, ready_path: str = "/health", timeout: float = 90) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (Path(log_dir) / f"{name.replace(' ', '-')}-{self.port}.log").open("w+")
        self.proc = subprocess.Popen(argv(self.port), cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{name} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{name} did not come up:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
SHARED_DATA = REPO.parent / "shared" / "data"

# ChatGLM-6B tiny: vocab ids laid out like the slim checkpoint (mask/gmask/bos/eos near the top).
CHATGLM_V1_HF = {
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": 160, "hidden_size": 64,
    "num_layers": 3, "num_attention_heads": 4, "inner_hidden_size": 96, "max_sequence_length": 128,
    "layernorm_epsilon": 1e-5, "position_encoding_2d": True, "bos_token_id": 154, "eos_token_id": 155,
    "mask_token_id": 150, "gmask_token_id": 151, "pad_token_id": 3, "torch_dtype": "float32",
}

CHATGLM_V2_HF = {
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "padded_vocab_size": 120, "hidden_size": 64,
    "num_layers": 2, "num_attention_heads": 4, "kv_channels": 16, "ffn_hidden_size": 80, "seq_length": 256,
    "layernorm_epsilon": 1e-5, "rmsnorm": True, "multi_query_attention": True, "multi_query_group_num": 2,
    "add_bias_linear": False, "add_qkv_bias": True, "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
}


def thudm_v1_state_dict(hf: dict, seed: int = 0, std: float = 0.2, pre_seq_len: int | None = None,
                        prefix_projection: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, L, V, ffn = hf["hidden_size"], hf["num_layers"], hf["vocab_size"], hf["inner_hidden_size"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.word_embeddings.weight": r(V, h)}
    for i in range(L):
        p = f"transformer.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + r(h)
        sd[p + "input_layernorm.bias"] = r(h)
        sd[p + "attention.query_key_value.weight"] = r(3 * h, h)
        sd[p + "attention.query_key_value.bias"] = r(3 * h)
        sd[p + "attention.dense.weight"] = r(h, h)
        sd[p + "attention.dense.bias"] = r(h)
        sd[p + "attention.rotary_emb.inv_freq"] = (1.0 / (10000 ** (torch.arange(0, h // hf["num_attention_heads"] // 2, 2).float() / (h // hf["num_attention_heads"] // 2)))).half()
        sd[p + "post_attention_layernorm.weight"] = 1 + r(h)
        sd[p + "post_attention_layernorm.bias"] = r(h)
        sd[p + "mlp.dense_h_to_4h.weight"] = r(ffn, h)
        sd[p + "mlp.dense_h_to_4h.bias"] = r(ffn)
        sd[p + "mlp.dense_4h_to_h.weight"] = r(h, ffn)
        sd[p + "mlp.dense_4h_to_h.bias"] = r(h)
    sd["transformer.final_layernorm.weight"] = 1 + r(h)
    sd["transformer.final_layernorm.bias"] = r(h)
    sd["lm_head.weight"] = r(V, h)
    if pre_seq_len:
        sd.update(prefix_weights(pre_seq_len, 2 * L * h, h, prefix_projection, g, embed_dim=h))
    return sd


def prefix_weights(P, kv_size, hidden, projection, g, embed_dim):
    if not projection:
        return {"transformer.prefix_encoder.embedding.weight": torch.randn(P, kv_size, generator=g) * 0.5}
    return {
        "transformer.prefix_encoder.embedding.weight": torch.randn(P, embed_dim, generator=g),
        "transformer.prefix_encoder.trans.0.weight": torch.randn(hidden, embed_dim, generator=g) * 0.2,
        "transformer.prefix_encoder.trans.0.bias": torch.randn(hidden, generator=g) * 0.2,
        "transformer.prefix_encoder.trans.2.weight": torch.randn(kv_size, hidden, generator=g) * 0.2,
        "transformer.prefix_encoder.trans.2.bias": torch.randn(kv_size, generator=g) * 0.2,
    }


def thudm_v2_state_dict(hf: dict, seed: int = 0, std: float = 0.2, pre_seq_len: int | None = None,
                        prefix_projection: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, L, V, ffn = hf["hidden_size"], hf["num_layers"], hf["padded_vocab_size"], hf["ffn_hidden_size"]
    H, d, kv = hf["num_attention_heads"], hf["kv_channels"], hf["multi_query_group_num"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.embedding.word_embeddings.weight": r(V, h),
          "transformer.rotary_pos_emb.inv_freq": torch.ones(d // 4)}
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + r(h)
        sd[p + "self_attention.query_key_value.weight"] = r((H + 2 * kv) * d, h)
        sd[p + "self_attention.query_key_value.bias"] = r((H + 2 * kv) * d)
        sd[p + "self_attention.dense.weight"] = r(h, H * d)
        sd[p + "post_attention_layernorm.weight"] = 1 + r(h)
        sd[p + "mlp.dense_h_to_4h.weight"] = r(2 * ffn, h)
        sd[p + "mlp.dense_4h_to_h.weight"] = r(h, ffn)
    sd["transformer.encoder.final_layernorm.weight"] = 1 + r(h)
    sd["transformer.output_layer.weight"] = r(V, h)
    if pre_seq_len:
        kv_size = 2 * L * kv * d
        sd.update(prefix_weights(pre_seq_len, kv_size, h, prefix_projection, g, embed_dim=kv_size))
    return sd


def write_folder(path: Path, hf: dict, sd: dict, fmt: str = "bin", shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf), encoding="utf-8")
    keys = list(sd)
    chunks = [keys[i::shards] for i in range(shards)]
    if fmt == "bin":
        if shards == 1:
            torch.save(sd, path / "pytorch_model.bin")
        else:
            wm = {}
            for j, ks in enumerate(chunks, 1):
                name = f"pytorch_model-{j:05d}-of-{shards:05d}.bin"
                torch.save({k: sd[k] for k in ks}, path / name)
                wm.update({k: name for k in ks})
            (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    else:
        from safetensors.torch import save_file

        if shards == 1:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
        else:
            wm = {}
            for j, ks in enumerate(chunks, 1):
                name = f"model-{j:05d}-of-{shards:05d}.safetensors"
                save_file({k: sd[k].contiguous() for k in ks}, str(path / name))
                wm.update({k: name for k in ks})
            (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return path


@pytest.fixture
def chatglm_v1_dir(tmp_path):
    return write_folder(tmp_path / "chatglm", CHATGLM_V1_HF, thudm_v1_state_dict(CHATGLM_V1_HF))


@pytest.fixture
def chatglm_v2_dir(tmp_path):
    return write_folder(tmp_path / "chatglm2", CHATGLM_V2_HF, thudm_v2_state_dict(CHATGLM_V2_HF))


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


# The original GLM: tiny checkpoints its hub code wrote, and that code's outputs (tests/data/glm/make_golden.py).
GLM_DATA = REPO / "tests" / "data" / "glm"


def glm_golden() -> dict:
    """tests/data/glm/golden.json (read once)."""
    if not hasattr(glm_golden, "_cache"):
        glm_golden._cache = json.loads((GLM_DATA / "golden.json").read_text(encoding="utf-8"))
    return glm_golden._cache


def glm_logits_case(fixture: str, case: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(the model inputs of a golden case, the original's logits at every 7th vocabulary column, its logsumexp)."""
    if not hasattr(glm_logits_case, "_cache"):
        glm_logits_case._cache = torch.load(GLM_DATA / "golden_logits.pt", weights_only=True)
    kwargs = {k: torch.tensor(v) for k, v in glm_golden()["fixtures"][fixture]["logits_cases"][case].items()}
    logits = glm_logits_case._cache
    return kwargs, logits[f"{fixture}/{case}/columns"], logits[f"{fixture}/{case}/logsumexp"]


def int4pack_with_block(q: torch.Tensor, block: int) -> torch.Tensor:
    """aten's CPU int4pack layout for a given block size, written out: [N/B, K, B/2] bytes, row r of a block in the
    low nibble and row r + B/2 in the high one, values u = q + 8, N padded to whole blocks with q = 0. (64 rows
    per block on AVX-512, 32 on AVX2: a file saved on one machine and loaded on the other.)"""
    n, k = q.shape
    n_pad = -(-n // block) * block
    u = torch.full((n_pad, k), 8, dtype=torch.uint8)
    u[:n] = (q.to(torch.int16) + 8).to(torch.uint8)
    v = u.view(n_pad // block, block, k).permute(0, 2, 1)  # [NB, K, B]
    return (v[..., : block // 2] | (v[..., block // 2:] << 4)).contiguous().view(n_pad, k // 2)


# GLM-130B: tiny SwissArmyTransformer (SAT 0.2.12) checkpoints in the layout GLM-130B publishes, and the original
# code's outputs on them (tests/data/glm130b/make_golden.py, which imports the helpers below, so that the golden
# script and the tests build byte-identical checkpoints).
GLM130B_DATA = REPO / "tests" / "data" / "glm130b"
# model_config.json as SAT writes it (training/model_io.py); the vocabulary is GLM-130B's own, so that the real
# command ids ([MASK] 150000 ... eop 150005) and eos 20002 exist in the tiny model.
GLM130B_TINY = {"model_class": "GLM130B", "tokenizer_type": "icetk-glm-130B", "num_layers": 2, "hidden_size": 16,
                "num_attention_heads": 2, "vocab_size": 150528, "hidden_dropout": 0.1, "attention_dropout": 0.1,
                "layernorm_order": "post", "inner_hidden_size": 24, "model_parallel_size": 1,
                "max_sequence_length": 64}
# GLM-130B's SEQUENTIAL_LAYERS / GLU_LAYERS / QUANTIZED_LAYERS of tools/convert_tp.py, restated (names after the
# `transformer.layers.N.` or `transformer.` prefix).
SAT_REPLICATED = {"input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias",
                  "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_4h_to_h.bias",
                  "attention.rotary_emb.inv_freq", "final_layernorm.weight", "final_layernorm.bias"}
SAT_GLU = {"mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias"}
SAT_QUANTIZED = {"attention.dense.weight", "attention.query_key_value.weight", "mlp.dense_h_to_4h.weight",
                 "mlp.dense_4h_to_h.weight"}
SAT_COLUMN_DIM = {"attention.dense.weight": 1, "mlp.dense_4h_to_h.weight": 1}


def glm130b_sat_state_dict(cfg: dict = GLM130B_TINY, seed: int = 0, std: float = 0.3) -> dict[str, torch.Tensor]:
    """A random GLM-130B state dict with SAT's names and shapes at tensor-parallel degree 1, in fp16 as GLM-130B
    ships (norm weights near 1). Key order is SAT's state_dict() order."""
    g = torch.Generator().manual_seed(seed)
    h, L, V, F_ = cfg["hidden_size"], cfg["num_layers"], cfg["vocab_size"], cfg["inner_hidden_size"]
    d = h // cfg["num_attention_heads"]

    def r(*shape, base=0.0):
        return (base + torch.randn(*shape, generator=g) * std).half()

    sd = {"mixins.rotary-embedding.rotary_emb.inv_freq": (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)).half(),
          "transformer.word_embeddings.weight": r(V, h)}
    for i in range(L):
        p = f"transformer.layers.{i}."
        sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"] = r(h, base=1.0), r(h)
        sd[p + "attention.query_key_value.weight"], sd[p + "attention.query_key_value.bias"] = r(3 * h, h), r(3 * h)
        sd[p + "attention.dense.weight"], sd[p + "attention.dense.bias"] = r(h, h), r(h)
        sd[p + "post_attention_layernorm.weight"], sd[p + "post_attention_layernorm.bias"] = r(h, base=1.0), r(h)
        sd[p + "mlp.dense_4h_to_h.weight"], sd[p + "mlp.dense_4h_to_h.bias"] = r(h, F_), r(h)
        sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_h_to_4h.bias"] = r(2 * F_, h), r(2 * F_)
    sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"] = r(h, base=1.0), r(h)
    return sd


def _sat_short_name(key: str) -> str:
    return ".".join(key.split(".")[3 if key.startswith("transformer.layers") else 1:])


def sat_reshard(shards: list[dict[str, torch.Tensor]], target_tp: int, bits: int | None = None
                ) -> list[dict[str, torch.Tensor]]:
    """What GLM-130B's tools/convert_tp.py writes for `target_tp` from these TP shards (restated from its code):
    replicated tensors from the first shard, the others concatenated / chunked on dim 0 (dim 1 for the two
    row-parallel weights), dense_h_to_4h by halves (GLU), and with `bits` the four linears quantized per target
    shard: scale = (max|w_row| / (2^(bits-1) - 1)).half(), q = round(w / scale) in the weights' dtype, INT4 packed two
    per byte with the even column in the high nibble."""
    src = len(shards)
    out = []
    for t in range(target_tp):
        if target_tp <= src:
            group = shards[t * (src // target_tp):(t + 1) * (src // target_tp)]
        else:
            group = [shards[t // (target_tp // src)]]
        new = {}
        for key in group[0]:
            name = _sat_short_name(key)
            if name in SAT_REPLICATED:
                new[key] = group[0][key]
                continue
            dim = SAT_COLUMN_DIM.get(name, 0)
            if target_tp <= src:
                if name in SAT_GLU and len(group) > 1:
                    halves = [s[key].chunk(2, dim=dim) for s in group]
                    w = torch.cat([a for a, _ in halves] + [b for _, b in halves], dim=dim)
                elif name in SAT_GLU:
                    w = group[0][key]
                else:
                    w = torch.cat([s[key] for s in group], dim=dim)
            else:
                n = target_tp // src
                if name in SAT_GLU:
                    parts = group[0][key].chunk(2 * n, dim=dim)
                    w = torch.cat([parts[t % n], parts[n + t % n]], dim=dim)
                else:
                    w = group[0][key].chunk(n, dim=dim)[t % n].clone()
            if bits is not None and name in SAT_QUANTIZED:
                scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
                q = torch.round(w / scale[:, None]).to(torch.int8)
                if bits == 4:
                    q = (q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)
                new[key], new[key + "_scale"] = q, scale
            else:
                new[key] = w
        out.append(new)
    return out


def write_sat_checkpoint(folder: Path, shards: list[dict[str, torch.Tensor]], iteration: str = "1000",
                         model_config: dict | None = GLM130B_TINY) -> Path:
    """A SAT checkpoint folder: `latest` naming the iteration, `<iteration>/mp_rank_XX_model_states.pt` holding
    {"module": state dict} (as convert_tp.py saves), and model_config.json when given."""
    (folder / iteration).mkdir(parents=True, exist_ok=True)
    (folder / "latest").write_text(iteration)
    for rank, sd in enumerate(shards):
        torch.save({"module": sd}, folder / iteration / f"mp_rank_{rank:02d}_model_states.pt")
    if model_config is not None:
        (folder / "model_config.json").write_text(json.dumps(dict(model_config, model_parallel_size=len(shards)),
                                                             indent=4))
    return folder
