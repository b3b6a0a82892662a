"""`glmkit.chat.parse_tool_calls`, the documented public path of tool-call parsing; it lives in glmkit.core.tools."""

from glmkit.core.tools import parse_tool_calls

__all__ = ["parse_tool_calls"]
