"""glmkit: the GLM family of language models on ordinary machines."""

__version__ = "0.1.0"

__all__ = ["GLMConfig", "load_model", "load_tokenizer", "__version__"]


def __getattr__(name):  # lazy, so `import glmkit` stays cheap for the CLI
    if name == "GLMConfig":
        from glmkit.config import GLMConfig

        return GLMConfig
    if name == "load_model":
        from glmkit.loader import load_model

        return load_model
    if name == "load_tokenizer":
        from glmkit.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'glmkit' has no attribute {name!r}")
