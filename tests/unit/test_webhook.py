"""The on-call webhook goes only where the operator said, as the operator said."""

from __future__ import annotations

from aiohttp import web

from appservice.webhook import HttpWebhook, webhook_problem
from tests.support.synapse import free_port


def test_plain_http_only_to_this_machine():
    assert webhook_problem("https://pager.example.org/hook") is None
    for local in ("http://127.0.0.1:8/x", "http://localhost/x", "http://[::1]:9/x"):
        assert webhook_problem(local) is None, local
    for far in ("http://pager.example.org/hook", "http://10.0.0.5/x", "ftp://x/y"):
        assert webhook_problem(far) is not None, far


async def test_a_redirect_is_not_followed_and_no_url_is_told():
    followed: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        followed.append("yes")
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", redirect)
    app.router.add_post("/elsewhere", elsewhere)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        hook = HttpWebhook(secret="s")
        assert await hook.post_json(f"http://127.0.0.1:{port}/hook", {"a": 1}) == "HTTP 302"
        assert followed == []
        refused = await hook.post_json("http://127.0.0.1:1/hook?token=SECRET", {"a": 1})
        assert refused is not None and "SECRET" not in refused and "127.0.0.1" not in refused
    finally:
        await runner.cleanup()
