"""Case records in words: what each step did, each kind of audit entry, a case's state and
the details a timeline line gives — marked for the catalogue here, said in a community's
language where they are used (staff timelines, the step-failed notice)."""

from __future__ import annotations

from bot.texts.catalogues import N_, Language

# What each step did, in words (its status is added when it is not "done").
_STEP_WORDS = {
    "notify": N_("member told (the notice)"),
    "remove": N_("member removed from the room"),
    "room_notice": N_("room told (no one named)"),
    "alert": N_("staff alerted"),
    "schedule": N_("check-in scheduled"),
    "checkin": N_("check-in opened"),
    "checkin_notice": N_("staff told the check-in is open"),
    "checkin_reminder": N_("staff reminded of the check-in"),
    "escalate": N_("alert raised again (unacknowledged)"),
    "redact_flag": N_("the flag taken out of the room"),
    "redact_message": N_("the flagged message taken out of the room"),
    "debrief": N_("moderator debriefed"),
    "withdraw_apology": N_("member sent an apology (flag withdrawn)"),
    "withdraw_reinvite": N_("member invited back (flag withdrawn)"),
    "withdraw_report": N_("staff told the flag was withdrawn"),
    "remove_again": N_("member removed again"),
    "corroboration": N_("staff told of another flag"),
    "rejoin": N_("staff told the member came back"),
    "purge": N_("personal data purged (retention)"),
    "unread_notice": N_("staff told the notice is unread"),
    "mark_dm": N_("the member's DM marked as a direct chat"),
}

# What each step sets out to do: what a notice of one that could not be done names (its
# outcome's words, `member removed again`, would read as if it had been).
_STEP_ACTIONS = {
    "notify": N_("telling the member (the notice)"),
    "remove": N_("removing the member from the room"),
    "room_notice": N_("telling the room (no one named)"),
    "alert": N_("alerting staff"),
    "schedule": N_("scheduling the check-in"),
    "checkin": N_("opening the check-in room"),
    "checkin_notice": N_("telling staff the check-in is open"),
    "checkin_reminder": N_("reminding staff of the check-in"),
    "escalate": N_("raising the alert again"),
    "redact_flag": N_("taking the flag out of the room"),
    "redact_message": N_("taking the flagged message out of the room"),
    "debrief": N_("debriefing the moderator"),
    "withdraw_apology": N_("apologising to the member (flag withdrawn)"),
    "withdraw_reinvite": N_("inviting the member back (flag withdrawn)"),
    "withdraw_report": N_("telling staff how the withdrawal went"),
    "remove_again": N_("removing the member again"),
    "corroboration": N_("telling staff of another flag"),
    "rejoin": N_("telling staff the member came back"),
    "purge": N_("purging personal data (retention)"),
    "unread_notice": N_("telling staff the notice is unread"),
    "mark_dm": N_("marking the member's DM as a direct chat"),
}

_KIND_WORDS = {
    **{f"step.{step}": words for step, words in _STEP_WORDS.items()},
    "flagged": N_("flagged"),
    "corroborated": N_("flagged again (corroboration)"),
    "step.notify": N_("member notified"),
    "notice_read": N_("member read the notice"),
    "step.unread_notice": N_("staff told the notice is unread"),
    "step.remove": N_("member removed"),
    "step.room_notice": N_("room notice"),
    "step.alert": N_("staff alerted"),
    "step.schedule": N_("check-in scheduled"),
    "step.checkin": N_("check-in opened"),
    "member_rejoined": N_("member rejoined the room"),
    "member_replied": N_("member replied in the DM (relayed)"),
    "checkin_member_wrote": N_("member wrote in the check-in room (relayed)"),
    "moderator_replied": N_("moderator replied to the debrief (relayed)"),
    "flag_withdrawn": N_("flag withdrawn"),
    "checkin_member_joined": N_("member joined the check-in"),
    "checkin_invite_rejected": N_("member declined the check-in invite"),
    "checkin_staff_joined": N_("staff joined the check-in"),
    "checkin_claimed": N_("check-in claimed"),
    "checkin_reminded": N_("staff reminded about the check-in"),
    "emergency_services_informed": N_("emergency services informed"),
    "note": N_("staff note"),
    "alert_acknowledged": N_("alert acknowledged"),
    "alert_raised_again": N_("alert raised again (unacknowledged)"),
    "closed": N_("case closed"),
    "reopened": N_("case reopened"),
    "held": N_("placed on hold"),
    "purged": N_("personal data purged (retention)"),
    "withdrawn": N_("flag withdrawn by staff"),
    "removal_decided": N_("staff decided to remove the member without the notice"),
    "notice_retried": N_("staff asked to try the notice again"),
    "command_refused": N_("a command refused (not staff)"),
    "claim_refused": N_("a check-in claim refused (not staff)"),
    "alert_paged": N_("the alert paged (webhook)"),
}
# The words of a case's state, of a step's status and of each detail a timeline line gives.
_WORDS = {
    "open": N_("open"),
    "closed": N_("closed"),
    "all": N_("all"),
    "failed": N_("failed"),
    "skipped": N_("skipped"),
    "started": N_("started"),
    "pending": N_("pending"),
    "method": N_("method"),
    "why": N_("why"),
    "via": N_("via"),
    "by": N_("by"),
    "flagger": N_("flagger"),
    "reference": N_("reference"),
    "service": N_("service"),
    "outcome": N_("outcome"),
    "error": N_("error"),
    "text": N_("text"),
    # How a flag or a command came (`method`, `via`).
    "reaction": N_("reaction"),
    "reply": N_("reply"),
    "command": N_("command"),
}


def step_action_words(step: str, language: Language) -> str:
    """What a step sets out to do, in words (`removing the member again`)."""
    english = _STEP_ACTIONS.get(step)
    return language._(english) if english else step.replace("_", " ")


def word(key: str, language: Language) -> str:
    """A state, status or detail's name in words, in `language` (as recorded if unknown)."""
    english = _WORDS.get(key)
    return language._(english) if english else key


def kind_words(kind: str, language: Language) -> str:
    """An entry's kind in words: the table's, else its name read as words."""
    english = _KIND_WORDS.get(kind)
    return language._(english) if english else kind.removeprefix("step.").replace("_", " ")
