"""Chat formatting: system prompts with and without a system role in the template."""

import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.inference.chat import ChatFormatter, template_has_system_role
from dro_jax.inference.settings import SAFETY_PROMPTS, resolve_system_prompt
from helpers import tiny_tokenizer

NO_SYSTEM_RAISES = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('system role not supported') }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
)
NO_SYSTEM_DROPS = "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\n' }}{% endif %}{% endfor %}ASSISTANT:"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_prompt_settings():
    assert resolve_system_prompt("none") is None
    assert resolve_system_prompt("short") == SAFETY_PROMPTS["short"]
    assert resolve_system_prompt("Be careful.") == "Be careful."
    assert SAFETY_PROMPTS["default"].startswith("You are a helpful, respectful and honest assistant.")
    assert "\n\nIf a question does not make any sense" in SAFETY_PROMPTS["default"]
    with pytest.raises(DroJaxError):
        resolve_system_prompt("   ")


def test_chatml_puts_the_prompt_in_the_system_message(tokenizer):
    formatter = ChatFormatter(tokenizer, SAFETY_PROMPTS["short"])
    text = tokenizer.decode(formatter.encode("How do I bake bread?"))
    assert text == (
        f"<|im_start|>system\n{SAFETY_PROMPTS['short']}<|im_end|>\n"
        "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_no_prompt_means_no_system_message(tokenizer):
    text = tokenizer.decode(ChatFormatter(tokenizer, None).encode("Hi"))
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("template", [NO_SYSTEM_RAISES, NO_SYSTEM_DROPS])
def test_templates_without_system_role_get_the_prompt_before_the_query(tokenizer, template):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    assert not template_has_system_role(tokenizer)
    formatter = ChatFormatter(tokenizer, "  Be safe.  ")
    assert formatter.messages("Hi") == [{"role": "user", "content": "Be safe.\n\nHi"}]
    assert "Be safe.\n\nHi" in tokenizer.decode(formatter.encode("Hi"))


def test_tokenizer_without_template():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(DroJaxError, match="no chat template"):
        ChatFormatter(tokenizer, None)


def test_only_the_no_prompt_setting_is_empty():
    import numpy as np

    from dro_jax.inference.settings import PromptSetting

    assert PromptSetting.from_text("none").is_empty and PromptSetting.from_text(None).is_empty
    assert not PromptSetting.from_text("short").is_empty
    assert not PromptSetting.soft("none", np.zeros((2, 4), np.float32)).is_empty  # a soft prompt, whatever its name
