"""Tokenizers rebuilt from a GGUF file's metadata with the `tokenizers` library: no PyTorch, no cache.

A GGUF file carries its vocabulary, merges, token types, special token ids
and chat template as metadata (llama.cpp's `tokenizer.*` keys). The llama
architecture uses two kinds of vocabulary:

- `gpt2`: byte-level BPE (SmolLM2, Llama-3). Text is split by the
  pre-tokenizer that `tokenizer.ggml.pre` names before BPE runs; a name this
  module does not know is refused rather than split the wrong way.
- `llama`: SentencePiece BPE with byte fallback (Llama-2, Mistral, Vicuna).
  Spaces become "▁", a "▁" is put in front of the text where
  `tokenizer.ggml.add_space_prefix` says so, and when the file lists no merges
  they are recovered from the pieces' scores (the higher a piece's score, the
  earlier it is merged), which is how SentencePiece ranks them.

Control tokens (`<|im_end|>`, `<s>`) are matched whole in the text, as
llama.cpp and transformers match them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dro_jax.common.errors import DroJaxError

# llama.cpp's token types (gguf.TokenType): only these three change how a token is used here.
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6
_SPACE = "\u2581"  # SentencePiece's visible space

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> (split digits one by one first?, the regex that cuts the text into words).
BYTE_LEVEL_SPLITS = {
    "default": (False, _GPT2_SPLIT),
    "gpt2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT),
    "starcoder": (True, _GPT2_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
}


@dataclasses.dataclass(frozen=True)
class GGUFVocabulary:
    """The tokenizer metadata of a GGUF file."""

    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre ("default" when absent)
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    special_ids: dict[str, int]  # bos / eos / unk / pad -> token id, for those the file names
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None


def read_vocabulary(reader: Any, path: Path) -> GGUFVocabulary:
    """The tokenizer metadata of the open `gguf.GGUFReader` `reader` of `path`."""

    def field(key: str, default: Any = None) -> Any:
        value = reader.fields.get(f"tokenizer.{key}")
        return default if value is None else value.contents()

    model = field("ggml.model")
    tokens = field("ggml.tokens")
    if model is None or tokens is None:
        raise DroJaxError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    special_ids = {
        name: field(f"ggml.{key}")
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id"))
    }
    return GGUFVocabulary(
        model=model,
        pre=field("ggml.pre", "default"),
        tokens=tokens,
        token_types=field("ggml.token_type", [1] * len(tokens)),
        scores=field("ggml.scores"),
        merges=field("ggml.merges"),
        special_ids={name: int(i) for name, i in special_ids.items() if i is not None and 0 <= i < len(tokens)},
        # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise
        add_bos=bool(field("ggml.add_bos_token", model == "llama")),
        add_eos=bool(field("ggml.add_eos_token", False)),
        add_space_prefix=bool(field("ggml.add_space_prefix", True)),
        chat_template=field("chat_template"),
    )


def build_tokenizer(vocabulary: GGUFVocabulary, path: Path):
    """A transformers fast tokenizer (chat template and special tokens included) for `vocabulary`."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    if vocabulary.model == "gpt2":
        backend = _byte_level_bpe(vocabulary, path)
    elif vocabulary.model == "llama":
        backend = _sentencepiece_bpe(vocabulary)
    else:
        raise DroJaxError(f"{path}: GGUF tokenizer model {vocabulary.model!r} is not supported (only 'gpt2' and 'llama')")
    kinds = list(zip(vocabulary.tokens, vocabulary.token_types))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, kind in kinds if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind in kinds if kind == _USER_DEFINED])
    special = {f"{name}_token": vocabulary.tokens[i] for name, i in vocabulary.special_ids.items()}
    _add_bos_eos(backend, vocabulary)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=vocabulary.chat_template, clean_up_tokenization_spaces=False, **special
    )


def _byte_level_bpe(vocabulary: GGUFVocabulary, path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if vocabulary.pre not in BYTE_LEVEL_SPLITS:
        raise DroJaxError(
            f"{path}: GGUF pre-tokenizer {vocabulary.pre!r} is not known to dro-jax (known: {', '.join(sorted(BYTE_LEVEL_SPLITS))}); "
            "load the model's Hugging Face directory instead"
        )
    digits, split = BYTE_LEVEL_SPLITS[vocabulary.pre]
    vocab = {token: index for index, token in enumerate(vocabulary.tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in vocabulary.merges or []]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(vocabulary: GGUFVocabulary):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(vocabulary.tokens)}
    if vocabulary.merges is not None:
        merges = [tuple(merge.split(" ", 1)) for merge in vocabulary.merges]
    else:
        merges = merges_from_scores(vocabulary)
    unk = vocabulary.special_ids.get("unk")
    backend = Tokenizer(models.BPE(
        vocab=vocab, merges=merges, unk_token=None if unk is None else vocabulary.tokens[unk], fuse_unk=True, byte_fallback=True,
    ))
    prepend = "first" if vocabulary.add_space_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme=prepend, split=False)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocabulary.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def merges_from_scores(vocabulary: GGUFVocabulary) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every way to cut a piece into two pieces of the
    vocabulary, the pieces with the highest scores merged first (ties: longer left part, then token ids)."""
    if vocabulary.scores is None:
        raise DroJaxError("a SentencePiece GGUF vocabulary needs either merges or scores")
    ids = {token: index for index, token in enumerate(vocabulary.tokens)}
    ranked = []
    for token, score, kind in zip(vocabulary.tokens, vocabulary.scores, vocabulary.token_types):
        if kind in (_UNKNOWN, _CONTROL, _BYTE):  # never the product of a merge
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-score, -len(left), -len(right), ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _add_bos_eos(backend, vocabulary: GGUFVocabulary) -> None:
    """Begin/end-of-sequence tokens around every encoded text, where the file asks for them."""
    from tokenizers import processors

    def wanted(name: str, flag: bool) -> str | None:
        index = vocabulary.special_ids.get(name)
        return vocabulary.tokens[index] if flag and index is not None else None

    bos, eos = wanted("bos", vocabulary.add_bos), wanted("eos", vocabulary.add_eos)
    if bos is None and eos is None:
        return
    first = [token for token in (bos, "$A", eos) if token]
    second = [f"{token}:1" for token in (bos, "$B", eos) if token]
    ends = [(token, vocabulary.tokens.index(token)) for token in (bos, eos) if token]
    backend.post_processor = processors.TemplateProcessing(single=first, pair=first + second, special_tokens=ends)
