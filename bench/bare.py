"""The practical limit for bench/run.py: a bare aiohttp handler that reads the body, parses the
same JSON WhatsTracking parses and answers a small JSON object, with nothing else in between.

    python bench/bare.py PORT [auto|asyncio]

Same event loop as WhatsTracking's server (``auto``: uvloop when installed; ``asyncio``: the
standard loop), no access log, 127.0.0.1 only.
"""

from __future__ import annotations

import json
import sys

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    body = json.loads(await request.read())
    return web.json_response({"ok": True, "keys": len(body)})


def main() -> None:
    port = int(sys.argv[1])
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/tracking", handle)
    app.router.add_post("/webhook/{company_id}", handle)
    app.router.add_post("/webhook/{company_id}/{suffix}", handle)
    app.router.add_get("/healthz", lambda request: web.json_response({"ok": True}))
    loop = None
    try:
        if sys.argv[2:3] == ["asyncio"]:
            raise ImportError
        import uvloop
    except ImportError:
        pass
    else:
        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
