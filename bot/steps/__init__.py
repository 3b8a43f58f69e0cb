"""Every step a case can have, in the policy's order (see bot/cases/engine.py for the contract).

Today's names are part of the record (`cases[].steps` in the export): steps are
added, never renamed.
"""

from __future__ import annotations

from bot.steps.alert import Alert
from bot.steps.base import CaseStep, Outcome, StepRun, Toolbox
from bot.steps.checkin import Checkin
from bot.steps.checkin_followup import CheckinNotice, CheckinReminder
from bot.steps.corroboration import Corroboration
from bot.steps.debrief import Debrief
from bot.steps.escalate import Escalate
from bot.steps.mark_dm import MarkDm
from bot.steps.notify import Notify
from bot.steps.purge import Purge
from bot.steps.redact import RedactFlag, RedactMessage
from bot.steps.rejoin import Rejoin
from bot.steps.remove import Remove
from bot.steps.remove_again import RemoveAgain
from bot.steps.room_notice import RoomNotice
from bot.steps.schedule import Schedule
from bot.steps.unread_notice import UnreadNotice
from bot.steps.withdraw import (
    WITHDRAW_STEPS,
    WithdrawApology,
    WithdrawReinvite,
    WithdrawReport,
)

# Every step, in the policy's order (which also breaks ties between steps due at once).
STEP_TYPES: tuple[type[CaseStep], ...] = (
    Notify,
    Remove,
    RoomNotice,
    Alert,
    Schedule,
    Checkin,
    CheckinNotice,
    CheckinReminder,
    Escalate,
    RedactFlag,
    RedactMessage,
    Debrief,
    WithdrawApology,
    WithdrawReinvite,
    WithdrawReport,
    RemoveAgain,
    Corroboration,
    Rejoin,
    Purge,
    UnreadNotice,
    MarkDm,
)
POSITIONS: dict[str, int] = {step.name: index for index, step in enumerate(STEP_TYPES)}
# The steps a new case starts with; the others are added when they are needed. (New
# steps go at the end: a step's position is recorded with it.)
CASE_STEPS: list[str] = [step.name for step in (*STEP_TYPES[:12], UnreadNotice, MarkDm)]


def build_steps(tools: Toolbox) -> dict[str, CaseStep]:
    return {step.name: step(tools) for step in STEP_TYPES}


__all__ = [
    "CASE_STEPS",
    "POSITIONS",
    "WITHDRAW_STEPS",
    "CaseStep",
    "Outcome",
    "StepRun",
    "Toolbox",
    "build_steps",
]
