"""Chat messages as the LLM contract takes them (runtimes/llm/CONTRACT.md, input `messages`):
one check, shared by the gateway's OpenAI API and the llm runtime, so that both paths
refuse the same messages with the same words, naming the field.

    from modelgw.chat import MessageError, check_messages

    try:
        messages = check_messages(json.loads(text))   # ready for the chat template
    except MessageError as err:
        err.field          # "messages[0].role": OpenAI's `param`
        err.code           # "invalid_value" | "unsupported_value" | None: OpenAI's `code`

Roles are what chat templates are written for: system, user, assistant. `developer` is
OpenAI's name for the system message of newer models; templates do not know it (Llama 3's
would write an unknown header, ours an unknown tag), so it is rendered as `system`.
`tool` and `function` (deprecated) carry the results of tool calls, which this runtime never
makes (requests with tools are refused): refused, as is any other role (e.g. "hacker",
which a template would otherwise render verbatim into the prompt).

Content is a string, null (empty), or OpenAI's content parts, of which only text parts
are supported (joined). Other keys of a message (e.g. `name`) reach the template as sent.
"""

from __future__ import annotations

from typing import Any

# role as sent -> role as the chat template sees it
TEMPLATE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TOOL_ROLES = ("tool", "function")


class MessageError(ValueError):
    """A chat message that cannot be rendered; `field` names the culprit."""

    def __init__(self, message: str, field: str, code: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.code = code


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages as the chat template gets them (content a string, developer -> system);
    MessageError naming the field otherwise."""
    if not isinstance(messages, list) or not messages:
        raise MessageError('messages must be a non-empty array of {"role", "content"} objects', "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise MessageError(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        role = message["role"]
        if role in TOOL_ROLES:
            raise MessageError(
                f"messages[{i}].role '{role}' is not supported: the runtime does not call tools, so there are "
                f"no tool results to send; roles: {', '.join(TEMPLATE_ROLES)}",
                f"messages[{i}].role", "unsupported_value",
            )
        if role not in TEMPLATE_ROLES:
            raise MessageError(
                f"messages[{i}].role must be one of {', '.join(TEMPLATE_ROLES)}, got {role[:40]!r}",
                f"messages[{i}].role", "invalid_value",
            )
        checked.append({**message, "role": TEMPLATE_ROLES[role], "content": _text(message.get("content"), i)})
    return checked


def _text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise MessageError(f"messages[{i}].content must be a string or an array of text parts",
                           f"messages[{i}].content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            got = f"type {kind!r}" if isinstance(kind, str) else "a part without a type"
            raise MessageError(f"messages[{i}].content[{j}]: only text parts are supported, got {got}",
                               f"messages[{i}].content[{j}]", "unsupported_value")
        text = part.get("text")
        if not isinstance(text, str):
            raise MessageError(f"messages[{i}].content[{j}].text must be a string", f"messages[{i}].content[{j}].text")
        texts.append(text)
    return "".join(texts)
