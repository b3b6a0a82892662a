"""glmkit: the GLM family of language models on ordinary machines.

The public names below are the library's front door; the package's layers and what each owns are in
docs/architecture.md. Imported lazily, so `import glmkit` (and `glmkit --help`) stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["GLMConfig", "GLMForCausalLM", "load_model", "save_model", "load_tokenizer", "score_choices", "__version__"]


def __getattr__(name):
    if name == "GLMConfig":
        from glmkit.core.config import GLMConfig

        return GLMConfig
    if name == "GLMForCausalLM":
        from glmkit.core.causal_lm import GLMForCausalLM

        return GLMForCausalLM
    if name == "load_model":
        from glmkit.loading.loader import load_model

        return load_model
    if name == "save_model":
        from glmkit.loading.loader import save_model

        return save_model
    if name == "load_tokenizer":
        from glmkit.core.tokenizer import load_tokenizer

        return load_tokenizer
    if name == "score_choices":
        from glmkit.core.scoring import score_choices

        return score_choices
    if name == "fill":  # the module, so that glmkit.fill.fill(...) works after a plain `import glmkit`
        import glmkit.fill

        return glmkit.fill
    raise AttributeError(f"module 'glmkit' has no attribute {name!r}")
