"""Prompt rendering: a task's plain-text prompt → the text the policy actually sees.

Instruct models answer well only when prompts arrive in the chat format they
were tuned on, so a prompt becomes `[system?, user]` messages rendered by the
tokenizer's chat template with the assistant turn opened. The tiny model and
base models have no template and see the raw prompt, as before.

A rendered template already holds the model's special tokens (e.g. Llama-3's
`<|begin_of_text|>`), so it must be tokenized with `add_special_tokens=False`
or the BOS would appear twice; `PromptFormat.add_special_tokens` carries that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fgrpo.errors import ConfigError, ModelError


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are rendered for one tokenizer."""

    template: str | None = None  # a Jinja chat template, or None for the raw prompt
    system_prompt: str | None = None

    @property
    def add_special_tokens(self) -> bool:
        return self.template is None

    def messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": prompt}]

    def render(self, tokenizer, prompts: list[str]) -> list[str]:
        """The texts to tokenize: chat-templated with the assistant turn opened, or the raw prompts."""
        if self.template is None:
            # No template: a system prompt, if any, is plain text before the prompt.
            return [f"{self.system_prompt}\n\n{p}" if self.system_prompt else p for p in prompts]
        try:
            return [
                tokenizer.apply_chat_template(
                    self.messages(prompt), chat_template=self.template, tokenize=False, add_generation_prompt=True
                )
                for prompt in prompts
            ]
        except Exception as exc:  # jinja2 errors (e.g. a template that rejects system messages)
            raise ModelError(f"the chat template failed to render a prompt: {type(exc).__name__}: {exc}") from exc


RAW = PromptFormat()


def prompt_format(tokenizer, chat_template: str = "auto", system_prompt: str | None = None) -> PromptFormat:
    """Pick the template from `model.chat_template`: 'auto', 'none', or a Jinja file."""
    if chat_template == "none":
        return PromptFormat(None, system_prompt)
    if chat_template == "auto":
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # some tokenizers ship several named templates
            template = template.get("default")
        return PromptFormat(template or None, system_prompt)
    path = Path(chat_template).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.chat_template = '{chat_template}' is not 'auto', 'none' or an existing Jinja template file"
        )
    return PromptFormat(path.read_text(encoding="utf-8"), system_prompt)
