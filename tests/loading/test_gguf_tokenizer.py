"""Tokenizers rebuilt from GGUF metadata without PyTorch give the token ids of transformers' GGUF tokenizer.

transformers reads a GGUF tokenizer only with PyTorch installed (the tests have
it); dro-jax builds its own from the same metadata, so these tests hold the two
to the same ids: the packaged SmolLM2 (byte-level BPE) on every packaged query
set and on adversarial strings, and a tiny SentencePiece vocabulary written
here the way llama.cpp writes Llama-2's (scores, byte tokens, no merges).
"""

from pathlib import Path

import gguf
import numpy as np
import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.data import QUERY_SETS
from dro_jax.data.queries import read_queries
from dro_jax.loading import load_model, resolve_model_path
from dro_jax.loading.gguf_tokenizer import build_tokenizer, read_vocabulary

ADVERSARIAL = [
    "", " ", "   ", "\t\n\r\n", "a  b\t\tc\n\n d ", " leading and trailing ",
    "12345 678 9.5% 1,000,000 3rd 2024-12-04", " 123 abc", "x1y22z333",
    "don't I'm you'LL it'S we've", "Ἀθῆναι Москва مرحبا नमस्ते 한국어 日本語の文章", "ÿ\x00\x01\x7f",
    "😀 🏳️‍🌈 👨‍👩‍👧 ☕️", "\u200b\u00a0zero-width\u200d", "tab\tand\u3000ideographic space",
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|><|im_end|>", "<|im_start", "< |im_end| >", "<s></s><unk>",
    "```python\nprint('hi')\n```", "C:\\path\\to\\file.txt", "a" * 300,
]


def transformers_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def ours(path: Path):
    return build_tokenizer(read_vocabulary(gguf.GGUFReader(str(path)), path), path)


def assert_same_ids(mine, theirs, texts):
    for text in texts:
        expected = theirs(text)["input_ids"]
        assert mine(text)["input_ids"] == expected, repr(text)
        assert mine.decode(expected) == theirs.decode(expected), repr(text)


@pytest.mark.real_model
def test_smollm2_gives_transformers_ids_on_every_packaged_set_and_adversarial_strings():
    path = resolve_model_path("smollm2")
    mine, theirs = ours(path), transformers_tokenizer(path)
    texts = [query for name in QUERY_SETS for query in read_queries(name)] + ADVERSARIAL
    assert len(texts) > 300
    assert_same_ids(mine, theirs, texts)
    assert mine.get_vocab() == theirs.get_vocab()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(mine, name) == getattr(theirs, name), name
    assert sorted(mine.all_special_ids) == sorted(theirs.all_special_ids)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    for messages in (conversation, conversation[1:]):
        kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
        assert mine.apply_chat_template(messages, **kwargs)["input_ids"] == theirs.apply_chat_template(messages, **kwargs)["input_ids"]


@pytest.mark.real_model
def test_the_packaged_model_loads_its_tokenizer_without_pytorch(tmp_path):
    """A child process where `import torch` fails loads SmolLM2 with its tokenizer and formats a chat as transformers does."""
    import os
    import subprocess
    import sys

    import dro_jax

    messages = [{"role": "user", "content": "Hi! 12 + 30?"}]
    path = resolve_model_path("smollm2")
    expected = transformers_tokenizer(path).apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from dro_jax.loading import load_model\n"
        "model = load_model('smollm2', progress=False)\n"
        "print(model.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)['input_ids'])\n"
    ).replace("MESSAGES", repr(messages))
    env = {**os.environ, "PYTHONPATH": str(Path(dro_jax.__file__).parents[1])}  # this checkout, whatever is installed
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(list(expected))


SENTENCEPIECE_CORPUS = [
    "How do I bake bread at home?", "Write a short poem about the sea and the wind.", "Explain how a lock works, step by step.",
    "You are a helpful, respectful and honest assistant.", "the theory of the thing", "Baking breads: 12 loaves.",
]


def write_sentencepiece_gguf(path: Path, *, add_space_prefix: bool = True, with_merges: bool = False) -> list[str]:
    """A SentencePiece-style vocabulary as llama.cpp writes Llama-2's: <unk> <s> </s>, 256 byte tokens, then
    pieces with "▁" for spaces, each scored by its merge rank (higher = merged earlier), no merges listed
    (unless `with_merges`). Returns the learned merges ("left right"), in rank order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(vocab_size=200, show_progress=False, special_tokens=[])
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    learner.train_from_iterator(SENTENCEPIECE_CORPUS * 3, trainer)
    learned = learner.to_str()
    import json

    model = json.loads(learned)["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>", *byte_tokens, *[p for p in pieces if p not in byte_tokens]]
    rank = {"".join(m.split(" ")): i for i, m in enumerate(merges)}
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *[-float(rank.get(p, len(merges) + i)) for i, p in enumerate(tokens[259:])]]
    types = [2, 3, 3, *[6] * 256, *[1] * (len(tokens) - 259)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny sentencepiece")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if with_merges:
        writer.add_token_merges(merges)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_space_prefix(add_space_prefix)
    writer.add_chat_template("{% for m in messages %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}")
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return merges


SENTENCEPIECE_TEXTS = [
    *SENTENCEPIECE_CORPUS, "How do I bake a theory?", "  two leading spaces", "unseen words: zebra, quixotic",
    "é ñ ü 日本 😀", "<s>[INST] hi [/INST]</s>", "line\nbreak\ttab", "", "12345",
]


def test_sentencepiece_vocabulary_gives_transformers_ids(tmp_path):
    path = tmp_path / "spm.gguf"
    write_sentencepiece_gguf(path)
    mine, theirs = ours(path), transformers_tokenizer(path)
    assert_same_ids(mine, theirs, SENTENCEPIECE_TEXTS)
    assert mine("bake")["input_ids"][0] == 1  # llama.cpp's default for SentencePiece vocabularies: BOS first
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    assert mine.apply_chat_template(messages, tokenize=True) == theirs.apply_chat_template(messages, tokenize=True)


def test_sentencepiece_without_a_space_prefix_follows_the_file(tmp_path):
    """`tokenizer.ggml.add_space_prefix = false`: no "▁" before the text, as llama.cpp tokenizes such a file
    (transformers prepends one whatever the flag says, so here the two differ on purpose)."""
    with_prefix, without = tmp_path / "with.gguf", tmp_path / "without.gguf"
    write_sentencepiece_gguf(with_prefix)
    write_sentencepiece_gguf(without, add_space_prefix=False)
    assert ours(with_prefix).tokenize("How do I") == ["\u2581How", "\u2581do", "\u2581I"]
    tokens = ours(without).tokenize("How do I")
    assert not tokens[0].startswith("\u2581") and "".join(tokens) == "How\u2581do\u2581I"
    assert ours(without).decode(ours(without)("How do I", add_special_tokens=False)["input_ids"]) == "How do I"


def test_sentencepiece_merges_from_the_file_agree_with_merges_from_scores(tmp_path):
    """A file that lists its merges is tokenized with those merges, in the file's order; one without them gets
    merges from the scores that tokenize the same."""
    import json

    with_merges, without = tmp_path / "with.gguf", tmp_path / "without.gguf"
    written = write_sentencepiece_gguf(with_merges, with_merges=True)
    write_sentencepiece_gguf(without)
    a, b = ours(with_merges), ours(without)
    used = json.loads(a.backend_tokenizer.to_str())["model"]["merges"]
    assert [m if isinstance(m, str) else " ".join(m) for m in used] == written
    for text in SENTENCEPIECE_TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"], repr(text)


def test_a_gguf_without_a_tokenizer_or_with_an_unknown_one_is_refused(tmp_path):
    import dataclasses

    from helpers import tiny_torch_model, write_tiny_gguf

    bare = tmp_path / "bare.gguf"
    write_tiny_gguf(tiny_torch_model("llama"), bare)
    assert load_model(bare, progress=False, with_tokenizer=False).tokenizer is None
    with pytest.raises(DroJaxError, match="bare.gguf: the GGUF file has no tokenizer"):
        load_model(bare, progress=False)
    path = tmp_path / "spm.gguf"
    write_sentencepiece_gguf(path)
    vocabulary = read_vocabulary(gguf.GGUFReader(str(path)), path)
    with pytest.raises(DroJaxError, match="tokenizer model 'bert' is not supported"):
        build_tokenizer(dataclasses.replace(vocabulary, model="bert"), path)
    with pytest.raises(DroJaxError, match="pre-tokenizer 'exotic' is not known"):
        build_tokenizer(dataclasses.replace(vocabulary, model="gpt2", pre="exotic", merges=[]), path)


def test_load_model_reads_a_byte_level_vocabulary_from_the_gguf_file(tmp_path):
    """A tiny llama written as GGUF with the tiny byte-level tokenizer as its metadata: `load_model` gives that
    tokenizer back, the same ids and chat formatting as the Hugging Face tokenizer it was written from."""
    from helpers import TOKENIZER_CORPUS, tiny_tokenizer, tiny_torch_model, write_tiny_gguf

    original = tiny_tokenizer()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny_torch_model("llama"), path, tokenizer=original)
    loaded = load_model(path, progress=False).tokenizer
    assert_same_ids(loaded, original, TOKENIZER_CORPUS + ADVERSARIAL)
    assert (loaded.eos_token_id, loaded.pad_token_id) == (original.eos_token_id, original.pad_token_id)
    messages = [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "How do I bake bread?"}]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    assert loaded.apply_chat_template(messages, **kwargs)["input_ids"] == original.apply_chat_template(messages, **kwargs)["input_ids"]
