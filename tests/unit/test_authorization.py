"""Who may flag whom, per room version: v12 creators outrank everyone; refusals say why."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.core.ports import RoomState
from bot.moderation.authorization import can_kick, decide_flag, is_staff, power_level

BOT, MOD, MEMBER, OWNER = "@safeguard:l", "@mod:l", "@member:l", "@owner:l"


def room(
    version: str = "10",
    users: dict | None = None,
    *,
    creator: str = OWNER,
    levels: bool = True,
    extra_creators: list[str] | None = None,
    **more,
) -> RoomState:
    content = {"room_version": version}
    if version in {str(v) for v in range(1, 11)}:
        content["creator"] = creator
    if extra_creators:
        content["additional_creators"] = extra_creators
    power = {"users": users or {}, **more} if levels else None
    return RoomState("!r:l", creator, content, power, version)


def decide(state: RoomState, flagger: str = MOD, target: str = MEMBER, staff: bool = False):
    return decide_flag(
        flagger=flagger,
        target=target,
        room=state,
        bot_user_id=BOT,
        moderator_power_level=50,
        target_is_staff=staff,
    )


def test_moderator_may_flag_a_member():
    assert decide(room(users={MOD: 50})) is None


def test_non_moderator_is_refused():
    refusal = decide(room(users={MOD: 49}))
    assert refusal is not None and refusal.code == "not_moderator"


def test_v12_creator_outranks_everyone_and_is_not_in_users():
    state = room("12", users={MOD: 50}, extra_creators=["@co:l"])
    assert power_level(OWNER, state) == math.inf == power_level("@co:l", state)
    assert decide(state, flagger=OWNER) is None
    refusal = decide(state, target=OWNER)
    assert refusal is not None and refusal.code == "target_privileged"
    assert decide(state, target="@co:l").code == "target_privileged"


def test_pre_v12_creator_is_only_what_power_levels_say():
    state = room("10", users={OWNER: 100, MOD: 50})
    assert power_level(OWNER, state) == 100
    assert power_level(OWNER, room("10", levels=False)) == 100
    assert power_level(OWNER, room("11", levels=False)) == 100  # v11: creator is the sender
    assert power_level(MEMBER, room("10", levels=False)) == 0


def test_users_default_and_string_levels():
    state = room(users={MOD: "60"}, users_default=10)
    assert power_level(MOD, state) == 60 and power_level(MEMBER, state) == 10
    assert power_level(MOD, room(users={MOD: "lots"})) == 0


@pytest.mark.parametrize(
    ("flagger", "target", "staff", "code"),
    [
        (BOT, MEMBER, False, "own_event"),
        (MOD, BOT, False, "target_is_bot"),
        (MOD, MOD, False, "self_flag"),
        (MOD, MEMBER, True, "target_is_staff"),
        (MOD, "@other-mod:l", False, "target_privileged"),
    ],
)
def test_refusals(flagger, target, staff, code):
    state = room(users={MOD: 50, "@other-mod:l": 50, BOT: 100})
    refusal = decide(state, flagger, target, staff)
    assert refusal is not None and refusal.code == code and refusal.detail


def test_target_not_below_flagger_is_refused():
    state = room(users={MOD: 55, MEMBER: 55})
    refusal = decide_flag(
        flagger=MOD,
        target=MEMBER,
        room=state,
        bot_user_id=BOT,
        moderator_power_level=50,
        target_is_staff=False,
    )
    # 55 >= moderator level: privileged comes first; with a higher bar, outranking shows.
    assert refusal is not None and refusal.code == "target_privileged"
    refusal = decide_flag(
        flagger=MOD,
        target=MEMBER,
        room=room(users={MOD: 55, MEMBER: 55}),
        bot_user_id=BOT,
        moderator_power_level=56,
        target_is_staff=False,
    )
    assert refusal is not None and refusal.code == "not_moderator"


def test_kick_power():
    state = room(users={BOT: 50}, kick=50)
    assert can_kick(BOT, 0, state)
    assert not can_kick(BOT, 50, state)  # must outrank the target
    assert not can_kick(BOT, 0, room(users={BOT: 40}, kick=50))


def test_staff_by_list_or_staff_room_power():
    staff_room = room(users={"@lead:l": 50})
    assert is_staff("@s:l", staff_users=["@s:l"], staff_room=None, staff_power_level=50)
    assert is_staff("@lead:l", staff_users=[], staff_room=staff_room, staff_power_level=50)
    assert not is_staff(MEMBER, staff_users=[], staff_room=staff_room, staff_power_level=50)


levels = st.integers(min_value=-10, max_value=150)


@given(levels, levels, st.integers(min_value=1, max_value=100))
def test_an_accepted_flag_always_means_a_moderator_above_its_target(flagger, target, bar):
    state = room(users={MOD: flagger, MEMBER: target})
    refusal = decide_flag(
        flagger=MOD,
        target=MEMBER,
        room=state,
        bot_user_id=BOT,
        moderator_power_level=bar,
        target_is_staff=False,
    )
    if refusal is None:
        assert flagger >= bar and target < bar and target < flagger
    else:
        assert not (flagger >= bar and target < bar and target < flagger)


def test_a_staff_room_whose_default_reaches_the_staff_level_is_told():
    from bot.config.settings import PolicySettings
    from bot.core.ports import RoomState
    from bot.rooms.staff_room import StaffRoom
    from bot.staff.members import StaffDirectory

    directory = StaffDirectory(None, PolicySettings(staff_power_level=50), StaffRoom("!s:l"))  # type: ignore[arg-type]

    def room(default: int) -> RoomState:
        create = {"sender": "@c:l", "content": {"room_version": "10"}}
        return RoomState.of("!s:l", create, {"users_default": default, "users": {}})

    assert directory.everyone_is_staff(room(50))
    assert not directory.everyone_is_staff(room(0))
    assert not directory.everyone_is_staff(None)


def test_a_staff_room_is_invite_only_and_made_by_staff():
    from bot.rooms.staff_room import not_staffs_room

    def state(
        creator: str,
        join_rule: str | None,
        admins: dict[str, int],
        joined: tuple[str, ...] = (),
        creators: tuple[str, ...] = (),
    ) -> list[dict]:
        create = {"additional_creators": list(creators)} if creators else {}
        events = [
            {"type": "m.room.create", "state_key": "", "sender": creator, "content": create},
            {"type": "m.room.power_levels", "state_key": "", "content": {"users": admins}},
        ]
        events += [
            {"type": "m.room.member", "state_key": user, "content": {"membership": "join"}}
            for user in joined
        ]
        if join_rule is not None:
            rule = {"join_rule": join_rule}
            events.append({"type": "m.room.join_rules", "state_key": "", "content": rule})
        return events

    staff = ["@lead:l"]
    assert not_staffs_room(state("@lead:l", "invite", {}), staff) is None
    admin = state("@other:l", None, {"@lead:l": 100}, joined=("@lead:l",))
    assert not_staffs_room(admin, staff) is None, "an admin who joined"
    # Power, or a place among the creators, can be given to anyone without their consent.
    assert "who has joined" in not_staffs_room(state("@other:l", None, {"@lead:l": 100}), staff)
    named = state("@other:l", None, {}, creators=("@lead:l",))
    assert "policy.staff" in not_staffs_room(named, staff)
    joined_creator = state("@other:l", None, {}, joined=("@lead:l",), creators=("@lead:l",))
    assert not_staffs_room(joined_creator, staff) is None
    invited = state("@other:l", None, {"@lead:l": 100})
    invited.append(
        {"type": "m.room.member", "state_key": "@lead:l", "content": {"membership": "invite"}}
    )
    assert "policy.staff" in not_staffs_room(invited, staff), "invited is not joined"
    assert "anyone can join" in not_staffs_room(state("@lead:l", "public", {}), staff)
    assert "restricted" in not_staffs_room(state("@lead:l", "restricted", {}), staff)
    assert "policy.staff" in not_staffs_room(state("@squatter:l", "invite", {}), staff)
    assert "policy.staff" in not_staffs_room(state("@x:l", "invite", {"@lead:l": 50}), staff)
