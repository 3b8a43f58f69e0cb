"""Keep trying something the service needs from the homeserver until it is done.

The staff rooms, the communities' Spaces and the rooms they list by alias may each be
out of reach at start (the homeserver away, an alias not made yet, an invite not sent
yet). None of them is fatal and none is forgotten: each is tried again with a growing
pause, a piece of news (an invite of the bot) cuts the pause short, and what is wrong
meanwhile is logged once each time it changes (and shown on /health by its owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from bot.core.ports import HomeserverUnavailable

log = logging.getLogger(__name__)
_pause = asyncio.sleep  # the wait between tries without news (replaced in tests)


async def until_done(
    attempt: Callable[[], Awaitable[str | None]],
    *,
    problem: str,
    what: str,
    first_pause: float,
    longest_pause: float,
    news: asyncio.Event | None = None,
) -> None:
    """Try `attempt` again (it answers what is still wrong, None once done) until it is
    done. `problem`: what the first try said; `what`: named in the log. An attempt that
    raises is logged and tried again: nothing but its success ends the trying."""
    pause = first_pause
    current: str | None = problem
    while current is not None:
        if news is None:
            await _pause(pause)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(news.wait(), pause)
            news.clear()
        pause = min(pause * 2, longest_pause)
        try:
            now = await attempt()
        except HomeserverUnavailable as exc:
            log.warning("%s: homeserver not reachable (%s); retrying", what, exc)
            continue
        except Exception as exc:  # the database, or a bug of ours: never the end of trying
            log.exception("%s: could not be done (%s); retrying", what, exc)
            continue
        if now is not None and now != current:
            log.error("%s: %s", what, now)
        current = now
