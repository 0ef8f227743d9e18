"""A request's prompt as token ids: its ids checked, its text encoded, its chat messages through the template.

Runs on the event loop; long texts are encoded in a worker thread so that the loop keeps streaming.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..contract.generation import (
    GenerationRequest,
    InvalidRequest,
    check_messages,
    check_one_source,
    check_prompt_ids,
    check_prompt_text,
)

_INLINE_TOKENIZE_CHARS = 8192  # longer prompts are tokenized in a worker thread, off the event loop


class PromptPreparer:
    """Prompts for one tokenizer. ``echo``: the output reproduces the prompt's text, so the prompt gets the
    text's tokens only (no BOS) and chat messages are answered by their last message, as the seed miner does."""

    def __init__(self, tokenizer: Any, *, echo: bool, max_prompt_chars: int) -> None:
        self._tokenizer = tokenizer
        self._echo = echo
        self._max_prompt_chars = max_prompt_chars
        # Generated text continues the prompt as the model was trained to see it: with the tokenizer's BOS where
        # it adds one (Llama, Mistral).
        self.encode: Callable[[str], list[int]] = _prompt_encoder(tokenizer, add_special_tokens=not echo)
        # Read once: transformers rebuilds its added-token table on every access (~0.1 ms for Llama 3's 256).
        self._control_tokens = _special_token_texts(tokenizer)

    async def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The request's prompt ids; ``InvalidRequest`` for a prompt the model must not see."""
        check_one_source(request)
        if request.prompt_ids is not None:
            return check_prompt_ids(request.prompt_ids, len(self._tokenizer))
        text = request.prompt if request.prompt is not None else self.format_messages(request.messages)
        if isinstance(text, list):
            return text  # the chat template's ids
        text = check_prompt_text(text, self._max_prompt_chars)
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self.encode(text)
        return await asyncio.to_thread(self.encode, text)

    def format_messages(self, messages: Any) -> str | list[int]:
        """The prompt for chat messages: the ids of the tokenizer's chat template with the generation prompt
        (generate mode, a tokenizer with a template), else text."""
        messages = check_messages(messages, self._max_prompt_chars)
        if self._echo:
            return messages[-1]["content"]
        template = getattr(self._tokenizer, "chat_template", None)
        if template:
            # The template's control tokens are tokens, so its text is tokenized with special tokens recognised:
            # a message must not smuggle them in as text (a fake end of turn, a fake system message).
            for token in self._control_tokens:
                if any(token in m["content"] for m in messages):
                    raise InvalidRequest(f"message content contains the model's control token {token!r}")
            try:
                return list(self._tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                                add_generation_prompt=True))
            except Exception as exc:  # noqa: BLE001 - templates raise their own errors (e.g. roles must alternate)
                raise InvalidRequest(f"messages do not fit the model's chat template: {exc}") from exc
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _special_token_texts(tokenizer: Any) -> list[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return [token.content for token in added.values() if token.special and token.content]


def _prompt_encoder(tokenizer: Any, add_special_tokens: bool) -> Callable[[str], list[int]]:
    """Encode prompts so that text such as "<|endoftext|>" stays text: clients must not inject control ids.
    ``add_special_tokens``: what the tokenizer's post-processor adds around a text (a BOS), if anything."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda text: tokenizer.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=True)
    from tokenizers import Tokenizer

    # A private copy: the flag would change how the shared tokenizer treats special tokens elsewhere.
    encoder = Tokenizer.from_str(backend.to_str())
    encoder.encode_special_tokens = True
    return lambda text: encoder.encode(text, add_special_tokens=add_special_tokens).ids
