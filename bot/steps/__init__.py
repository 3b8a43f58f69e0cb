"""Every step a case can have, in the policy's order (see bot/engine.py for the contract).

Today's names are part of the record (`cases[].steps` in the export): steps are
added, never renamed.
"""

from __future__ import annotations

from bot.steps.alert import Alert
from bot.steps.base import CaseStep, Outcome, StepRun, Toolbox
from bot.steps.checkin import Checkin
from bot.steps.checkin_followup import CheckinNotice, CheckinReminder
from bot.steps.escalate import Escalate
from bot.steps.notify import Notify
from bot.steps.remove import Remove
from bot.steps.room_notice import RoomNotice
from bot.steps.schedule import Schedule

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
)
# The steps every new case starts with, and each step's position in the policy's order.
CASE_STEPS: list[str] = [step.name for step in STEP_TYPES]
POSITIONS: dict[str, int] = {name: index for index, name in enumerate(CASE_STEPS)}


def build_steps(tools: Toolbox) -> dict[str, CaseStep]:
    return {step.name: step(tools) for step in STEP_TYPES}


__all__ = ["CASE_STEPS", "POSITIONS", "CaseStep", "Outcome", "StepRun", "Toolbox", "build_steps"]
