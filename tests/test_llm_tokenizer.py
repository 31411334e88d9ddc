"""Tokenizer parity with transformers (GGUF metadata and tokenizer.json) and chat templates."""

from __future__ import annotations

import pytest

import transformers  # noqa: F401  (installed by `make test`: a missing reference must fail, not skip)

from llm_helpers import _TMP, hf_gguf_tokenizer, smollm2  # noqa: E402

from models.llm.tokenizer import Tokenizer  # noqa: E402

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 ≈ π and 1,000,000 > 999999.",
    "   leading spaces,\ttabs\t\tand    runs of     spaces   ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line\n",
    "Unicode: café naïve Ångström — “quotes” … ñ ü ß Ελληνικά Русский 日本語 中文 한국어",
    "Emoji 🙂🚀👩‍💻 and symbols ©®™ ∑∫√ ←→",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "<|endoftext|>text right after a special token<|im_end|>",
    "def f(x):\n    return x**2  # comment\n\nprint(f(12))",
    "I'm sure they'll say it's fine; we've done what you'd do. DON'T SHOUT",
    "",
    " ",
    "a" * 50 + "  " + "9" * 20,
]


@pytest.fixture(scope="module")
def ours():
    return smollm2()[1]


@pytest.fixture(scope="module")
def theirs():
    return hf_gguf_tokenizer()


def test_token_ids_match_transformers(ours, theirs):
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text


def test_decode_round_trip(ours, theirs):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(ours, theirs):
    convs = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    ]
    for conv in convs:
        for gen in (True, False):
            text = ours.apply_chat_template(conv, add_generation_prompt=gen)
            assert text == theirs.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            ref_ids = theirs.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
            ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
            assert ours.encode_chat(conv, add_generation_prompt=gen) == list(ref_ids)
    assert ours.apply_chat_template("Hi there") == ours.apply_chat_template(convs[0])


def test_special_tokens(ours):
    assert ours.eos_id == 2 and ours.eos_token == "<|im_end|>"
    assert ours.bos_id == 1 and not ours.add_bos
    assert ours.encode("<|im_start|>") == [1]
    assert ours.vocab_size == 49152


def test_delimiter_token_set(ours):
    ids = ours.token_ids_containing("\n\n")
    assert ours.encode("\n\n")[0] in ids
    assert all("\n\n" in ours.decode([i], skip_special_tokens=False) for i in ids)
    assert ours.encode("a b")[0] not in ids
    with pytest.raises(ValueError, match="non-empty"):
        ours.token_ids_containing("")


def test_tokenizer_json_directory_matches_transformers(theirs):
    # transformers writes tokenizer.json + tokenizer_config.json (+ chat template); we read them back.
    import os

    path = os.path.join(_TMP, "smollm2-tokenizer")
    theirs.save_pretrained(path)
    tok = Tokenizer.from_hf_dir(path)
    for text in TEXTS:
        assert tok.encode(text) == theirs(text)["input_ids"], text
    conv = [{"role": "user", "content": "Hello"}]
    assert tok.apply_chat_template(conv) == theirs.apply_chat_template(conv, tokenize=False,
                                                                       add_generation_prompt=True)
    assert tok.eos_id == theirs.eos_token_id


def test_bad_messages_rejected(ours):
    with pytest.raises(ValueError, match="role"):
        ours.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match="str"):
        ours.encode(123)
