"""A Gradio chat page in the browser, the answer streamed as it is generated: `build_demo` builds it for a loaded
model, `launch` serves it (`glmkit web` is glmkit.commands.web).

The page names the model and has max_length / top_p / temperature sliders set to the model family's chat
defaults (glmkit.core.chat.DEFAULTS, max_length capped at the context; temperature 0 = greedy) and a Clear button.
All chat events share one concurrency slot, so only one answer is generated at a time (the model's KV cache is per
model); other visitors wait in Gradio's queue.

Tool calls (ChatGLM3, GLM-4): with `tools` (`glmkit web --tools FILE.py`, glmkit.serving.toolbox) each call the model
makes is run and shown as its own message titled "🛠️ name({...})" holding the result, and the answer continues
below it. Without tools, a call the model writes anyway is shown as it wrote it.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator

from glmkit.core.chat import DEFAULTS, family_of, response_text
from glmkit.serving.toolbox import Toolbox, chat_with_tools, check_family, describe_call

# Gradio phones home for analytics unless told not to; this tool runs offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def chat_kwargs(max_length: float, top_p: float, temperature: float, context: int) -> dict[str, Any]:
    """Slider values -> model.stream_chat keyword arguments."""
    kwargs: dict[str, Any] = {"max_length": max(1, min(int(max_length), context))}
    if temperature <= 0 or top_p <= 0:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    return kwargs


def turn_messages(model: Any, tokenizer: Any, query: str, messages: list, history: list, kwargs: dict,
                  tools: Toolbox | None = None) -> Iterator[tuple[list, list]]:
    """One chat turn as the page shows it: (chat messages, model history) after every step; a tool call becomes a
    message titled with the call, holding its result (gradio's message metadata)."""
    messages = list(messages or []) + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
    yield messages, history
    for kind, value, history in chat_with_tools(model, tokenizer, query, history, tools, **kwargs):
        if kind == "answer":
            if isinstance(value, str) or tools is None:
                messages[-1] = {"role": "assistant", "content": response_text(value)}
        elif kind == "call":
            messages[-1] = {"role": "assistant", "content": "…",
                            "metadata": {"title": f"🛠️ {describe_call(value)}"}}
        elif kind == "result":
            messages[-1] = {**messages[-1], "content": value[1]}
            messages.append({"role": "assistant", "content": ""})
        else:
            messages[-1] = {"role": "assistant", "content": f"(stopped after {value} tool calls in a row)"}
        yield messages, history


def build_demo(model: Any, tokenizer: Any, name: str, tools: Toolbox | None = None):
    """The Gradio Blocks page for one loaded model (with `tools`, the model's tool calls are run and shown)."""
    import gradio as gr

    context = int(model.config.max_seq_len)
    defaults = DEFAULTS[family_of(tokenizer)]
    if tools is not None:
        check_family(tokenizer)

    def respond(query: str, messages: list, history: list, max_length: float, top_p: float,
                temperature: float) -> Iterator[tuple[list, list, str]]:
        query = (query or "").strip()
        if not query:
            yield messages, history, ""
            return
        kwargs = chat_kwargs(max_length, top_p, temperature, context)
        for shown, history in turn_messages(model, tokenizer, query, messages, history, kwargs, tools):
            yield shown, history, ""

    with gr.Blocks(title=f"glmkit chat: {name}") as demo:
        gr.Markdown(f"## glmkit chat\nModel: **{name}** (context {context} tokens)", elem_id="model-name")
        chatbot = gr.Chatbot(label=name, height=540, elem_id="chatbot")
        history = gr.State([])  # what model.chat takes as history, kept apart from the rendered messages
        with gr.Row():
            box = gr.Textbox(show_label=False, placeholder="Type a message and press Enter", scale=5,
                             elem_id="query", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            max_length = gr.Slider(1, context, value=min(defaults["max_length"], context), step=1,
                                   label="max_length", elem_id="max-length")
            top_p = gr.Slider(0, 1, value=defaults["top_p"], step=0.01, label="top_p", elem_id="top-p")
            temperature = gr.Slider(0, 1, value=defaults["temperature"], step=0.01,
                                    label="temperature (0 = greedy)", elem_id="temperature")
        clear = gr.Button("Clear", elem_id="clear")

        inputs = [box, chatbot, history, max_length, top_p, temperature]
        outputs = [chatbot, history, box]
        answering = [event(respond, inputs, outputs, concurrency_limit=1, concurrency_id="chat",
                           show_progress="hidden") for event in (box.submit, send.click)]
        # Clear stops an answer being streamed, then empties the chat and the history
        clear.click(lambda: ([], [], ""), None, outputs, queue=False, cancels=answering)
        chatbot.clear(lambda: [], None, history, queue=False)  # the chat box's own trash button: forget it too
    return demo


def _theme():
    """Gradio's default theme with system fonts: the default pulls web fonts from Google, unreachable offline."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def launch(model: Any, tokenizer: Any, name: str, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, tools: Toolbox | None = None) -> None:
    """Serves `build_demo(model, tokenizer, name, tools)` on host:port until interrupted; share=True also opens a
    public gradio.live link (needs internet)."""
    demo = build_demo(model, tokenizer, name, tools)
    print(f"glmkit web: {name} on http://{host}:{port} (Ctrl-C stops)", file=sys.stderr, flush=True)
    demo.queue(max_size=64).launch(server_name=host, server_port=port, share=share,
                                   inbrowser=False, show_error=True, ssr_mode=False, theme=_theme(), quiet=True)
