"""Chat templates from GGUF metadata render as HF transformers renders them."""
import pytest

from minisparse import MinisparseError, load_tokenizer
from minisparse.chat import apply_chat_template
from minisparse.cli import encode_chat

from conftest import shared_fixture


def test_phi3_template_renders_the_roles_and_the_generation_prompt():
    tok = load_tokenizer(shared_fixture("vocab/ggml-vocab-phi-3.gguf"))
    text = apply_chat_template(tok, [{"role": "user", "content": "Hi"}])
    # Phi-3's template: bos, then "<|user|>\n{content}<|end|>\n<|assistant|>\n"
    assert text == "<s><|user|>\nHi<|end|>\n<|assistant|>\n"
    ids = encode_chat(tok, [{"role": "user", "content": "Hi"}])
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id       # BOS written once
    assert tok.hf.token_to_id("<|user|>") in ids                     # special tokens parsed


def test_models_without_a_template_get_the_plain_form(stories_path):
    tok = load_tokenizer(stories_path)
    assert tok.chat_template is None
    assert apply_chat_template(tok, [{"role": "user", "content": "Hi"}]) == "User: Hi\nAssistant:"


def test_a_broken_template_is_a_clear_error(stories_path):
    tok = load_tokenizer(stories_path)
    tok.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(MinisparseError, match="chat_template.*no system role"):
        apply_chat_template(tok, [{"role": "user", "content": "Hi"}])
