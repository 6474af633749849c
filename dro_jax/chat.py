"""Chat formatting and the human-written safety prompts.

A safety prompt is the system message of the chat template. Templates with no
system role (Llama-2 style `[INST]` without `<<SYS>>`, Mistral) get the prompt
text, stripped, and a blank line in front of the first user message instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dro_jax.errors import DroJaxError

SAFETY_PROMPTS = {
    "default": (
        "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
        "while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, "
        "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
        "in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why instead "
        "of answering something not correct. If you don't know the answer to a question, please don't share "
        "false information."
    ),
    "short": "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.",
    "mistral": (
        "You are an AI assistant. Always assist with care, respect, and truth. Please respond with utmost utility "
        "yet securely and avoid harmful, unethical, prejudiced, or negative content. Also ensure replies promote "
        "fairness and positivity."
    ),
}
NO_PROMPT = "none"
PROMPT_SETTINGS = (NO_PROMPT, *SAFETY_PROMPTS)


def resolve_system_prompt(setting: str | None) -> str | None:
    """`none` -> no system message; a prompt name -> its text; anything else is custom text."""
    if setting is None or setting == NO_PROMPT:
        return None
    if not setting.strip():
        raise DroJaxError("the system prompt is empty; use 'none' for no system message")
    return SAFETY_PROMPTS.get(setting, setting)


def template_has_system_role(tokenizer: Any) -> bool:
    """Whether the chat template renders a system message (some raise, some drop it)."""
    probe = "dro-jax system probe"
    messages = [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # jinja raises TemplateError from the template's own `raise_exception`
        return False
    return probe in rendered


@dataclasses.dataclass
class ChatFormatter:
    """Encodes user queries under one system prompt, ready for generation.

    Note that some templates (SmolLM2's among them) insert their own default
    system message when none is given, so "no safety prompt" means that one.
    """

    tokenizer: Any
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DroJaxError("the model's tokenizer has no chat template")
        self._system_role = self.system_prompt is None or template_has_system_role(self.tokenizer)

    def messages(self, query: str) -> list[dict[str, str]]:
        if self.system_prompt is None:
            return [{"role": "user", "content": query}]
        if self._system_role:
            return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": query}]
        return [{"role": "user", "content": f"{self.system_prompt.strip()}\n\n{query}"}]

    def encode(self, query: str) -> list[int]:
        """Token ids of the chat-formatted query with the generation prompt appended."""
        encoded = self.tokenizer.apply_chat_template(
            self.messages(query), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])
