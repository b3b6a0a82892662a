"""Training data: GLM blank-infilling samples (blank.py) and streaming corpus readers (corpus.py)."""

from glmkit.training.data.blank import (
    IGNORE_INDEX,
    BlankBuilder,
    BlankConfig,
    BlankSample,
    SpecialIds,
    attention_mask_for_segments,
    collate_rows,
    pack_samples,
)
from glmkit.training.data.corpus import BlankInfillingDataset, Source, iter_documents

__all__ = [
    "IGNORE_INDEX", "BlankBuilder", "BlankConfig", "BlankSample", "SpecialIds", "attention_mask_for_segments",
    "collate_rows", "pack_samples", "BlankInfillingDataset", "Source", "iter_documents",
]
