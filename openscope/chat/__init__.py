"""Chat: conversations rendered with a role per token, role-aware feature statistics, base-vs-chat diffing
(and, from the contrast-direction modules, refusal directions, jailbreaks, steering sweeps)."""

from openscope.chat.template import MODEL, ROLES, SYSTEM, TEMPLATE, USER, Message, render

__all__ = ["MODEL", "ROLES", "SYSTEM", "TEMPLATE", "USER", "Message", "render"]
