"""Chat formatting: a prompt setting (`dro_jax.inference.settings`) in the system-message slot of the chat template.

A safety prompt is the system message of the chat template. Templates with no
system role (Llama-2 style `[INST]` without `<<SYS>>`, Mistral) get the prompt
text, stripped, and a blank line in front of the first user message instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dro_jax.common.errors import DroJaxError

# Stands in for the system text while locating the slot that soft-prompt rows fill;
# plain words, so it tokenizes like ordinary prompt text at both ends.
SLOT_PLACEHOLDER = "Follow these instructions."


def template_has_system_role(tokenizer: Any) -> bool:
    """Whether the chat template renders a system message (some raise, some drop it)."""
    probe = "dro-jax system probe"
    messages = [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # jinja raises TemplateError from the template's own `raise_exception`
        return False
    return probe in rendered


TURN_PROBE = "dro-jax end-of-turn probe"


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special tokens the chat template writes after an assistant message's content (`<|im_end|>`,
    `<|eot_id|>`, `<|end_of_turn|>`, `</s>`, ...), in order; empty when the template cannot render one turn.

    Found by rendering a one-turn conversation whose assistant content is a probe text and tokenizing what follows
    the probe: whatever is special there is what the model was trained to write when its turn ends, whether or
    not the tokenizer calls it end-of-sequence."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": TURN_PROBE}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # jinja raises TemplateError from the template's own `raise_exception`
        return []
    at = rendered.rfind(TURN_PROBE)
    if at < 0:
        return []
    special = set(tokenizer.all_special_ids) | {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    after = tokenizer(rendered[at + len(TURN_PROBE):], add_special_tokens=False)["input_ids"]
    return [i for i in after if i in special]


def stop_token_ids(tokenizer: Any, source: str = "the model") -> list[int]:
    """The ids that end a generated turn: the tokenizer's end-of-sequence token(s), then the template's
    `end_of_turn_ids`, without repeats. EOS alone misses the turn end of templates whose end-of-turn token is
    not EOS (a generation would run on into a made-up next turn until the length limit)."""
    eos = tokenizer.eos_token_id
    ids = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None] + end_of_turn_ids(tokenizer)
    if not ids:
        raise DroJaxError(
            f"{source}: the tokenizer defines no end-of-sequence token and its chat template no end-of-turn token to stop generation"
        )
    return list(dict.fromkeys(ids))


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

    def encode_with_slot(self, query: str) -> tuple[list[int], int, int]:
        """Token ids as `encode`, plus the [start, stop) range of the system text's tokens.

        The range is found from character offsets, so it holds for any template
        and tokenizer; a token that straddles the text's edge (a leading space
        merged into its first word) belongs to the range.
        """
        if self.system_prompt is None:
            raise ValueError("encode_with_slot needs a system prompt")
        rendered = self.tokenizer.apply_chat_template(self.messages(query), add_generation_prompt=True, tokenize=False)
        content = self.system_prompt.strip()
        begin = rendered.find(content)
        if begin < 0:
            raise DroJaxError("the chat template rewrites the system prompt, so its tokens cannot be located")
        end = begin + len(content)
        encoded = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        inside = [i for i, (first, last) in enumerate(encoded["offset_mapping"]) if first < end and last > begin]
        return list(encoded["input_ids"]), inside[0], inside[-1] + 1

    def encode_setting(self, query: str, soft_rows: int, filler_id: int) -> tuple[list[int], int]:
        """Ids with `soft_rows` filler tokens where the system text goes, and the first filler's index.

        Use a formatter built with `SLOT_PLACEHOLDER` as its system prompt; the
        fillers are replaced by soft-prompt rows at embedding time.
        """
        ids, start, stop = self.encode_with_slot(query)
        return ids[:start] + [filler_id] * soft_rows + ids[stop:], start
