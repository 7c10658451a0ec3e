"""Chat prompts: render the GGUF's `tokenizer.chat_template` (Jinja2, as HF transformers does).

The template is run in a sandboxed Jinja2 environment (a GGUF file is untrusted input) with the
variables HF passes: messages, bos_token, eos_token, add_generation_prompt. Left out on purpose:
tool calls and multimodal content. Models without a template get a plain "User:/Assistant:" form.
"""
from __future__ import annotations

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import MinisparseError

FALLBACK = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")


def _raise(message):
    raise TemplateError(message)


def apply_chat_template(tokenizer, messages, add_generation_prompt=True) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]).

    >>> class T: chat_template = None; bos_id = None; eos_id = None; tokens = []
    >>> apply_chat_template(T(), [{"role": "user", "content": "hi"}])
    'User: hi\\nAssistant:'
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    tok = lambda i: tokenizer.tokens[i] if i is not None and i < len(tokenizer.tokens) else ""  # noqa: E731
    source = tokenizer.chat_template or FALLBACK
    try:
        return env.from_string(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=tok(tokenizer.bos_id), eos_token=tok(tokenizer.eos_id))
    except TemplateError as e:
        raise MinisparseError(f"field 'tokenizer.chat_template': the template failed: {e}") from None
