"""`glmkit.fill.fill`, the documented public path of blank filling; it lives in glmkit.core.fill."""

from glmkit.core.fill import FillResult, fill

__all__ = ["FillResult", "fill"]
