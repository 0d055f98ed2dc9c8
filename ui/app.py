"""The Gradio chat app: an HTTP client of tunedesk's OpenAI-compatible endpoint.

It only talks to the server through the official `openai` SDK (the same way any customer
integration would), so what people try here is exactly what the API serves. Stopping a reply
closes the HTTP stream, which makes the server abort generation and free its slot.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import gradio as gr
from openai import AsyncOpenAI, OpenAI

from .feedback import FeedbackStore

log = logging.getLogger("tunedesk.ui")

CSS = """
#td-title h1 { margin-bottom: 0; }
#td-chat { min-height: 460px; }
footer { display: none !important; }
"""


def message_text(content: Any) -> str:
    """Gradio 6 keeps message content as text or a list of typed parts; we need the text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, list):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def to_openai_messages(history: list[dict[str, Any]], system: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for m in history:
        text = message_text(m.get("content"))
        if m.get("role") in ("user", "assistant") and text:
            messages.append({"role": m["role"], "content": text})
    return messages


def load_examples(path: str | Path | None, limit: int = 8) -> list[str]:
    """Example questions: the first user turns of a prepared split or prompt/completion file."""
    if not path or not Path(path).exists():
        return []
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            question = row.get("prompt") or next(
                (m.get("content") for m in row.get("messages", []) if m.get("role") == "user"),
                None,
            )
            if question and question not in out:
                out.append(str(question).removesuffix("->").strip())
            if len(out) >= limit:
                break
    return out


class ChatBackend:
    """Everything the app does over HTTP: list models, stream a reply."""

    def __init__(self, endpoint: str, api_key: str | None) -> None:
        self.endpoint = endpoint.rstrip("/")
        key = api_key or "none"
        self.client = OpenAI(base_url=self.endpoint, api_key=key, max_retries=0)
        self.aclient = AsyncOpenAI(base_url=self.endpoint, api_key=key, max_retries=0)

    def models(self) -> list[str]:
        try:
            return [m.id for m in self.client.models.list().data]
        except Exception as exc:  # the server may be starting; the picker can be refreshed
            log.warning("could not list models at %s: %s", self.endpoint, exc)
            return []

    async def stream(
        self, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float
    ) -> AsyncIterator[str]:
        stream = await self.aclient.chat.completions.create(
            model=model,
            messages=messages,
            stream=True,
            max_tokens=max_tokens,
            temperature=temperature,
        )
        try:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        finally:
            # Runs on Stop too (the task is cancelled): closing the response tells the server
            # the client has gone, so it stops generating.
            await stream.close()


def build_app(
    endpoint: str,
    api_key: str | None = None,
    feedback_db: str | Path = "feedback.sqlite",
    examples: list[str] | None = None,
    title: str = "tunedesk",
) -> gr.Blocks:
    backend = ChatBackend(endpoint, api_key)
    store = FeedbackStore(feedback_db)
    models = backend.models()

    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"# {title}\nChat with a fine-tuned assistant at `{endpoint}`.", elem_id="td-title"
        )
        with gr.Row():
            model = gr.Dropdown(
                choices=models,
                value=models[-1] if models else None,
                label="Model",
                allow_custom_value=True,
                scale=4,
                elem_id="td-model",
            )
            refresh = gr.Button("Refresh models", scale=1, size="sm")
        with gr.Accordion("System prompt and sampling", open=False):
            system = gr.Textbox(label="System prompt", lines=2, elem_id="td-system")
            with gr.Row():
                max_tokens = gr.Slider(16, 4096, value=256, step=16, label="Max tokens")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature")
        chatbot = gr.Chatbot(
            label="Conversation",
            elem_id="td-chat",
            height=460,
            feedback_options=("Like", "Dislike"),
        )
        with gr.Row():
            question = gr.Textbox(
                placeholder="Ask a question…",
                show_label=False,
                scale=6,
                elem_id="td-input",
                autofocus=True,
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="td-send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="td-stop")
        if examples:
            gr.Examples(
                examples=[[q] for q in examples], inputs=[question], label="Example questions"
            )
        with gr.Accordion("Improve the last answer", open=False, elem_id="td-improve"):
            better = gr.Textbox(label="Better answer", lines=4, elem_id="td-better")
            save = gr.Button("Save correction", elem_id="td-save")
        status = gr.Markdown(elem_id="td-status")

        def add_question(text: str, history: list[dict]) -> tuple[str, list[dict]]:
            if not text.strip():
                return text, history
            return "", [*history, {"role": "user", "content": text.strip()}]

        async def reply(
            history: list[dict], model_name: str, system_prompt: str, limit: float, temp: float
        ) -> AsyncIterator[list[dict]]:
            if not history or history[-1].get("role") != "user":
                yield history
                return
            if not model_name:
                yield [*history, {"role": "assistant", "content": "⚠ No model selected."}]
                return
            messages = to_openai_messages(history, system_prompt)
            answer = ""
            history = [*history, {"role": "assistant", "content": ""}]
            try:
                async for piece in backend.stream(model_name, messages, int(limit), float(temp)):
                    answer += piece
                    history[-1] = {"role": "assistant", "content": answer}
                    yield history
            except Exception as exc:
                history[-1] = {"role": "assistant", "content": f"{answer}\n\n⚠ {exc}"}
                yield history

        def on_like(
            history: list[dict], model_name: str, system_prompt: str, data: gr.LikeData
        ) -> str:
            index = data.index if isinstance(data.index, int) else data.index[0]
            answer = message_text(history[index].get("content"))
            context = to_openai_messages(history[:index], system_prompt)
            rating = 1 if data.liked else -1
            row = store.add(model_name or "", context, answer, rating)
            return f"Feedback #{row} saved ({'👍' if rating > 0 else '👎'})."

        def on_save(history: list[dict], model_name: str, system_prompt: str, text: str):
            last = max(
                (i for i, m in enumerate(history) if m.get("role") == "assistant"), default=None
            )
            if last is None or not text.strip():
                return "Nothing to save: ask a question and write a better answer first.", text
            answer = message_text(history[last].get("content"))
            context = to_openai_messages(history[:last], system_prompt)
            row = store.add(model_name or "", context, answer, 0, better_answer=text)
            return f"Correction #{row} saved.", ""

        inputs = [chatbot, model, system, max_tokens, temperature]
        submit = question.submit(add_question, [question, chatbot], [question, chatbot]).then(
            reply, inputs, chatbot
        )
        clicked = send.click(add_question, [question, chatbot], [question, chatbot]).then(
            reply, inputs, chatbot
        )
        stop.click(None, cancels=[submit, clicked])
        refresh.click(lambda: gr.Dropdown(choices=backend.models()), None, model)
        chatbot.like(on_like, [chatbot, model, system], status)
        save.click(on_save, [chatbot, model, system, better], [status, better])
    return app


def launch(app: gr.Blocks, host: str, port: int, block: bool = True) -> None:
    app.queue(default_concurrency_limit=16).launch(
        server_name=host,
        server_port=port,
        css=CSS,
        prevent_thread_lock=not block,
        show_error=True,
        theme=gr.themes.Soft(),
    )
