"""The policy core never reaches up into the edge: no aiohttp, nio or appservice in bot/.

Inside bot/, the packages import one way: each from those below it in LAYERS, never
from one above, so a newcomer can read them bottom up and a cycle cannot creep in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BOT = Path(__file__).resolve().parents[2] / "bot"
FORBIDDEN = ("aiohttp", "nio", "appservice")

# bot's packages, lowest first. A module may import from its own package and from
# those before it here.
LAYERS = (
    "core",  # the homeserver port, metrics, reactions, the audit chain, loops
    "store",  # SQL (the audit log's rows need core's chain rules)
    "config",  # settings and the deployment (which carries the store's Provenance)
    "texts",
    "rooms",  # the bot's own rooms; the staff room's refusal reports need texts
    "steps",
    "cases",  # the engine that runs the steps
    "intake",
    "moderation",  # membership answers through the intake's dispatcher
    "members",  # what any member may ask (`!policy`), answered through the dispatcher
    "checkin",  # who joins a check-in reads moderation's room state
    "staff",  # `!case` claims a check-in; `!rooms` reads the bot's powers in a room
    "referral",  # the decision asks who is staff and when the check-in falls due
    "community",  # each event to its room's community's handlers
)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(BOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def bot_imports(path: Path) -> set[str]:
    """Every bot module `path` imports, relative imports resolved, `from bot import x` as bot.x."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # a module's relative imports start from its package
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == "bot"}


def layer_of(module: str) -> str | None:
    """The package of bot that `module` (a dotted name) belongs to; None for bot itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("path", sorted(BOT.rglob("*.py")), ids=lambda p: p.name)
def test_bot_module_stays_below_the_edge(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN}
    assert not bad, f"{path.relative_to(BOT.parent)} imports {sorted(bad)}"


def test_every_package_has_its_place():
    packages = {p.parent.name for p in BOT.glob("*/__init__.py")}
    assert packages == set(LAYERS), "a package of bot/ missing from LAYERS, or one gone"
    stray = sorted(p.name for p in BOT.glob("*.py") if p.name != "__init__.py")
    assert not stray, f"modules directly in bot/, outside every package: {stray}"


@pytest.mark.parametrize(
    "path",
    sorted(p for p in BOT.rglob("*.py") if p.parent != BOT),
    ids=lambda p: str(p.relative_to(BOT)),
)
def test_bot_packages_import_one_way(path):
    own = layer_of(module_name(path))
    rank = LAYERS.index(own)
    above = {
        m
        for m in bot_imports(path)
        if (layer := layer_of(m)) in LAYERS and LAYERS.index(layer) > rank
    }
    assert not above, (
        f"{path.relative_to(BOT.parent)} (in {own}/) imports from a package above it: "
        f"{sorted(above)}"
    )
