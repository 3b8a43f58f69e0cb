"""The texts the steps send, rendered so that a broken template never stalls a case.

`run` refuses a template that fails to render (bot.templates.validate_templates),
so a failure here means something validation could not foresee. The member still
gets the built-in text at once; the fall-back is reported (recorded, staff told)
through `on_fallback`, once per template.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from bot.settings import MessageTemplates
from bot.templates import TemplateError

log = logging.getLogger(__name__)
T = TypeVar("T")
BUILT_IN = MessageTemplates()


class Texts:
    def __init__(
        self,
        messages: MessageTemplates,
        on_fallback: Callable[[str, str], None] = lambda name, problem: None,
    ) -> None:
        self.messages = messages
        self._on_fallback = on_fallback
        self._reported: set[str] = set()

    def render(self, render: Callable[[MessageTemplates], T]) -> T:
        """`render(messages)`, or with the built-in texts if a configured one fails."""
        try:
            return render(self.messages)
        except TemplateError as exc:
            log.error("%s; the built-in text was used instead", exc)
            if exc.name not in self._reported:
                self._reported.add(exc.name)
                self._on_fallback(exc.name, str(exc))
            return render(BUILT_IN)

    def __call__(self, render: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """texts(render_x, ...) renders with the configured templates, falling back safely."""
        return self.render(lambda messages: render(messages, *args, **kwargs))
