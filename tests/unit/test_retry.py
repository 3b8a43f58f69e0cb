"""bot/core/retry.py: what is tried again until done backs off, is cut short by news,
survives the homeserver being away, and logs a problem as it changes, not every try."""

from __future__ import annotations

import asyncio
import logging

from bot.core.ports import HomeserverUnavailable
from bot.core.retry import until_done


class Attempts:
    """Answers in turn from `answers` (an exception is raised), noting the loop's time."""

    def __init__(self, *answers: str | Exception | None) -> None:
        self._answers = list(answers)
        self.at: list[float] = []

    async def __call__(self) -> str | None:
        self.at.append(asyncio.get_running_loop().time())
        answer = self._answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_backs_off_doubling_to_the_longest_pause_and_stops_when_done(monkeypatch):
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr("bot.core.retry._pause", sleep)
    attempt = Attempts("still", "still", "still", "still", None)
    await until_done(attempt, problem="first", what="x", first_pause=1, longest_pause=4)
    assert len(attempt.at) == 5, "tried until done, not after"
    assert pauses == [1, 2, 4, 4, 4]


async def test_news_cuts_the_pause_short():
    news = asyncio.Event()
    attempt = Attempts(None)
    task = asyncio.create_task(
        until_done(attempt, problem="p", what="x", first_pause=30, longest_pause=60, news=news)
    )
    await asyncio.sleep(0.01)
    assert not attempt.at
    news.set()
    await asyncio.wait_for(task, 1)
    assert len(attempt.at) == 1
    assert not news.is_set(), "the news is taken, so the next pause is a pause"


async def test_the_homeserver_away_is_tried_again_not_raised(caplog):
    attempt = Attempts(HomeserverUnavailable("down"), None)
    with caplog.at_level(logging.WARNING):
        await until_done(attempt, problem="p", what="x", first_pause=0.001, longest_pause=0.01)
    assert len(attempt.at) == 2
    assert "homeserver not reachable (down)" in caplog.text


async def test_a_problem_is_logged_as_it_changes_not_at_every_try(caplog):
    attempt = Attempts("same", "same", "other", "other", None)
    with caplog.at_level(logging.ERROR):
        await until_done(
            attempt, problem="same", what="the thing", first_pause=0.001, longest_pause=0.001
        )
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert said == ["the thing: other"]


async def test_any_error_is_logged_and_tried_again_never_the_end(caplog):
    """A database error or a bug of ours in one attempt does not end the trying (a task
    that died of it would leave /health saying what it said last, forever)."""
    attempt = Attempts(RuntimeError("database is locked"), None)
    with caplog.at_level(logging.ERROR):
        await until_done(attempt, problem="p", what="x", first_pause=0.001, longest_pause=0.01)
    assert len(attempt.at) == 2
    assert "x: could not be done (database is locked); retrying" in caplog.text
