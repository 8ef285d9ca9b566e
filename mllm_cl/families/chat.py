"""A family's chat format, written once and rendered two ways.

`ChatFormat.render` turns a conversation into the training / prompt text and the character spans
of the answers (what the labels train on); `ChatFormat.jinja` writes the same format as a Hugging
Face chat template (what `export` ships with a checkpoint, so `apply_chat_template` reproduces the
training text). Both are built from the same strings, and the family contract test checks that they
agree on every family.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Rendered:
    """A conversation rendered to text; `targets` are the character spans trained on."""

    text: str
    targets: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class ChatFormat:
    """Literal strings around each turn.

    Args:
        image: what one image becomes in the text (before the processor expands it to image tokens).
        system: (prefix, suffix) around a system message.
        user: (prefix, suffix) around a user message.
        assistant: (prefix, end of turn, after): the answer and its end-of-turn marker are trained
            on (the model learns to stop); `after` (e.g. a newline) is not.
        generation_prompt: appended after the last user turn when generating.
    """

    image: str
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str, str]
    generation_prompt: str

    @property
    def end_of_turn(self) -> str:
        return self.assistant[1]

    def render(
        self, messages: list[dict], add_generation_prompt: bool = False, default_system: str | None = None
    ) -> Rendered:
        """`messages` (string contents, images already as `image`) to text and answer spans.

        `default_system` is rendered as a system turn when the conversation does not open with one.
        """
        out, targets = "", []
        if default_system is not None and (not messages or messages[0]["role"] != "system"):
            out += self.system[0] + default_system + self.system[1]
        for msg in messages:
            role, content = msg["role"], msg["content"]
            if role == "assistant":
                prefix, end, after = self.assistant
                out += prefix
                start = len(out)
                out += content + end
                targets.append((start, len(out)))
                out += after
            elif role in ("system", "user"):
                prefix, suffix = self.system if role == "system" else self.user
                out += prefix + content + suffix
            else:
                raise ValueError(f"message role {role!r} unknown; use system, user or assistant")
        if add_generation_prompt:
            out += self.generation_prompt
        return Rendered(out, targets)

    def jinja(self, default_system: str | None = None) -> str:
        """The same format as a Hugging Face chat template.

        Message content may be a string (with ``<image>`` marks, as our samples have) or HF's list of
        ``{"type": "image" | "text"}`` items; an image item becomes the image string and a newline,
        as `mllm_cl.data.collate.prepare_messages` places it.
        """
        sys_pre, sys_suf = map(_literal, self.system)
        user_pre, user_suf = map(_literal, self.user)
        a_pre, a_end, a_after = map(_literal, self.assistant)
        head = ""
        if default_system is not None:
            opening = _literal(self.system[0] + default_system + self.system[1])
            head = f"{{%- if not messages or messages[0]['role'] != 'system' -%}}{{{{ {opening} }}}}{{%- endif -%}}"
        return (
            f"{{%- set IMAGE = {_literal(self.image)} -%}}"
            + _CONTENT
            + head
            + "{%- for m in messages -%}"
            + f"{{%- if m['role'] == 'assistant' -%}}{{{{ {a_pre} + content(m) + {a_end} + {a_after} }}}}"
            + f"{{%- elif m['role'] == 'system' -%}}{{{{ {sys_pre} + content(m) + {sys_suf} }}}}"
            + f"{{%- elif m['role'] == 'user' -%}}{{{{ {user_pre} + content(m) + {user_suf} }}}}"
            + "{%- else -%}{{ raise_exception('message role ' + m['role'] + ' unknown') }}{%- endif -%}"
            + "{%- endfor -%}"
            + f"{{%- if add_generation_prompt -%}}{{{{ {_literal(self.generation_prompt)} }}}}{{%- endif -%}}"
        )


# Content of one message: a string with <image> marks, or HF's list of image / text items.
# Literal text goes through {{ '...' }} so whitespace control never eats it.
_CONTENT = (
    "{%- macro content(m) -%}{%- if m['content'] is string -%}"
    "{{ m['content'] | replace('<image>', IMAGE) }}{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ IMAGE + '\\n' }}{%- elif c['type'] == 'text' -%}{{ c['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)


def _literal(text: str) -> str:
    """`text` as a Jinja string literal (Jinja unescapes like Python: backslash, quote, newline)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
