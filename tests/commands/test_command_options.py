"""Every command's options come from one dataclass through glmkit.core.options: the flags of old, plus
`--config FILE.yaml` and `key=value` overrides (file < overrides < flags), with bad values as usage errors."""

from __future__ import annotations

import pytest

from glmkit.commands import chat, fill, generate, serve, web
from glmkit.commands.common import ModelOptions, parse_options


def _parse(module, cls, argv):
    return parse_options(cls, module.build_parser(), argv)


def test_generate_flags_as_before():
    args = _parse(generate, generate.GenerateOptions, ["hi", "--max-new-tokens", "5", "--top-p", "0.5", "--stop", "a",
                                                       "--stop", "b", "--quantize", "int8", "--device", "cpu"])
    assert (args.prompt, args.max_new_tokens, args.top_p, args.stop) == ("hi", 5, 0.5, ["a", "b"])
    assert (args.quantize, args.device, args.model, args.temperature, args.seed) == ("int8", "cpu", "glm-tiny", 0.8,
                                                                                     None)
    assert isinstance(args, ModelOptions)
    assert _parse(generate, generate.GenerateOptions, ["hi"]).stop == []


def test_config_file_overrides_and_flags(tmp_path):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("max_new_tokens: 7\ntemperature: 0\nstop: [END]\nmodel: some/where\n", encoding="utf-8")
    args = _parse(generate, generate.GenerateOptions, ["--config", str(cfg), "hi", "top_k=3", "temperature=0.5",
                                                       "--max-new-tokens", "9"])
    assert (args.max_new_tokens, args.temperature, args.top_k, args.stop, args.model) == (9, 0.5, 3, ["END"],
                                                                                         "some/where")


def test_bad_values_are_usage_errors(tmp_path, capsys):
    for argv in (["hi", "max_new_tokens=many"], ["hi", "nonsense=1"], ["hi", "--quantize", "int3"],
                 ["hi", "stray"], ["hi", "--config", str(tmp_path / "missing.yaml")], []):
        with pytest.raises(SystemExit) as exit_:
            _parse(generate, generate.GenerateOptions, argv)
        assert exit_.value.code == 2, argv
    err = capsys.readouterr().err
    assert "max_new_tokens must be an integer" in err and "unknown options ['nonsense']" in err
    assert "no config file at" in err and "the following arguments are required: prompt" in err


def test_serve_special_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMKIT_API_KEY", "sekret")
    args = _parse(serve, serve.ServeOptions, ["--kv-cache-memory", "2GiB", "--no-prefix-cache", "--log-level", "debug"])
    assert (args.kv_cache_memory, args.prefix_caching, args.log_level, args.api_key) == (2 * 1024**3, False, "debug",
                                                                                       "sekret")
    monkeypatch.delenv("GLMKIT_API_KEY")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("kv_cache_memory: 512MB\nport: 9000\nprefix_caching: false\n", encoding="utf-8")
    args = _parse(serve, serve.ServeOptions, ["--config", str(cfg), "--port", "9001"])
    assert (args.kv_cache_memory, args.port, args.prefix_caching, args.api_key) == (512 * 1000**2, 9001, False, None)
    assert _parse(serve, serve.ServeOptions, []).prefix_caching is True
    with pytest.raises(SystemExit):
        _parse(serve, serve.ServeOptions, ["kv_cache_memory=lots"])


def test_chat_web_fill():
    args = _parse(chat, chat.ChatOptions, ["--no-thinking", "--stop", "x", "system=be brief"])
    assert (args.thinking, args.stop, args.system) == (False, ["x"], "be brief")
    args = _parse(chat, chat.ChatOptions, [])
    assert (args.thinking, args.stop, args.max_length) == (None, None, None)
    args = _parse(web, web.WebOptions, ["--share", "port=7000"])
    assert (args.share, args.port, args.host) == (True, 7000, "127.0.0.1")
    args = _parse(fill, fill.FillOptions, ["a [MASK] b", "--do-sample", "--show-blanks", "seed=3"])
    assert (args.text, args.do_sample, args.show_blanks, args.seed, args.model) == ("a [MASK] b", True, True, 3,
                                                                                   "glm-tiny")


def test_checkpoint_commands(tmp_path, capsys):
    from glmkit.commands import bench, convert, memory_plan, merge_lora, quantize

    args = _parse(quantize, quantize.QuantizeOptions, ["a", "b", "--bits", "4", "--group-size", "64", "--symmetric"])
    assert (args.src, args.dst, args.bits, args.group_size, args.symmetric, args.calibrate) == ("a", "b", 4, 64,
                                                                                              True, False)
    cfg = tmp_path / "q.yaml"
    cfg.write_text("bits: 8\ncalibrate: true\ncalibration_samples: 4\n", encoding="utf-8")
    args = _parse(quantize, quantize.QuantizeOptions, ["a", "b", "--config", str(cfg)])
    assert (args.bits, args.calibrate, args.calibration_samples) == (8, True, 4)
    for argv in (["a", "b"], ["a", "b", "bits=3"], ["a", "b", "--bits", "3"]):
        with pytest.raises(SystemExit):
            _parse(quantize, quantize.QuantizeOptions, argv)
    assert "missing required option(s): bits" in capsys.readouterr().err

    args = _parse(convert, convert.ConvertOptions, ["s", "d", "--max-shard-size", "500MB"])
    assert (args.src, args.dst, args.max_shard_size) == ("s", "d", 500 * 1024**2)
    assert _parse(convert, convert.ConvertOptions, ["s", "d"]).max_shard_size == 2 * 1024**3
    assert _parse(convert, convert.ConvertOptions, ["s", "d", "max_shard_size=1GB"]).max_shard_size == 1024**3

    args = _parse(memory_plan, memory_plan.MemoryPlanOptions, ["--bits", "8", "--bits", "4", "--seq-len", "4096"])
    assert (args.bits, args.seq_len, args.batch) == ([8, 4], 4096, 1)
    assert _parse(memory_plan, memory_plan.MemoryPlanOptions, ["bits=[16]"]).bits == [16]
    with pytest.raises(SystemExit):
        _parse(memory_plan, memory_plan.MemoryPlanOptions, ["bits=[3]"])

    args = _parse(merge_lora, merge_lora.MergeLoraOptions, ["--base", "glm-tiny", "--adapter", "x", "output=y"])
    assert (args.base, args.adapter, args.output, args.dtype) == ("glm-tiny", "x", "y", None)
    args = _parse(bench, bench.BenchOptions, ["--layers", "2", "--json", "repeats=2"])
    assert (args.layers, args.json, args.repeats, args.precisions) == (2, True, 2, "bf16,int8,int4")
