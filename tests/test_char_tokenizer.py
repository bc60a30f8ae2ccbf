"""The quickstart's character tokenizer refuses characters outside its vocabulary (never [PAD] silently)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from agdo import tasks
from agdo.eval import encode_prompts
from agdo.training.sft_data import encode_example

UNKNOWN = r"character 'a' \(U\+0061\) at index 3 of the text '12\+a' is not in the tokenizer's vocabulary"


def test_known_text_and_special_tokens_encode():
    tokenizer = tasks.build_tokenizer()
    vocab = tokenizer.get_vocab()
    ids = tokenizer("12+3=", add_special_tokens=False)["input_ids"]
    assert ids == [vocab[c] for c in "12+3="]
    assert tokenizer("1[MASK]2", add_special_tokens=False)["input_ids"] == [vocab["1"], tokenizer.mask_token_id, vocab["2"]]


@pytest.mark.parametrize(
    "encode",
    [
        lambda t: t("12+a", add_special_tokens=False),  # the call sft_data and eval make
        lambda t: t(["1", "12+a"]),
        lambda t: t.encode("12+a"),
        lambda t: t.tokenize("12+a"),
        lambda t: encode_example(t, "12+a", "3"),
        lambda t: encode_prompts(t, ["1+2", "12+a"], "cpu"),
    ],
)
def test_unknown_character_is_an_error_naming_it(encode):
    with pytest.raises(ValueError, match=UNKNOWN):
        encode(tasks.build_tokenizer())


@pytest.mark.parametrize("text, char", [(" ", "' '"), ("1\n", r"'\\n'"), ("é", "'é'"), ("[PAD", r"'\['")])
def test_other_unknown_characters(text, char):
    with pytest.raises(ValueError, match=f"character {char}"):
        tasks.build_tokenizer()(text, add_special_tokens=False)


def test_chat_template_path_checks_too():
    tokenizer = tasks.build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}="
    with pytest.raises(ValueError, match="character 'x'"):
        encode_prompts(tokenizer, ["1+x"], "cpu")
    with pytest.raises(ValueError, match="character 'x'"):
        encode_example(tokenizer, "1+2", "x")


def test_saved_tokenizer_reloads_as_a_plain_fast_tokenizer(tmp_path):
    tokenizer = tasks.build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert config["tokenizer_class"] == type(reloaded).__name__ != "CharTokenizer"
    assert reloaded("12+3=")["input_ids"] == tokenizer("12+3=")["input_ids"]
    assert len(reloaded) == len(tokenizer) and reloaded.mask_token_id == tokenizer.mask_token_id
    # Documented: the reloaded plain tokenizer does not check; as_char_tokenizer gives the check back.
    checked = tasks.as_char_tokenizer(reloaded)
    assert checked("12+3=")["input_ids"] == tokenizer("12+3=")["input_ids"]
    with pytest.raises(ValueError, match=UNKNOWN):
        checked("12+a")
