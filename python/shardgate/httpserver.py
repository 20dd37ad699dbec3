"""What shardgate's two aiohttp servers (control API, event handler) share against hostile
clients: an ``Expect`` handler and a request logger.

aiohttp answers a request it cannot parse with 400 but logs it at ERROR with a traceback,
so any client could fill the log with tracebacks; here that is one INFO line. And
aiohttp's default ``Expect`` handler echoes the header into its 417 body, which fails
with a 500 when the header holds bytes that are not UTF-8; this one never echoes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["expect_handler", "server_logger"]


class _ServerLogger(logging.Logger):
    """``aiohttp.server`` for our servers: a client's malformed request (a 4xx) is one
    INFO line without traceback; everything else is logged as aiohttp logs it."""

    def exception(  # type: ignore[override]
        self,
        msg: object,
        *args: object,
        exc_info: BaseException | bool = True,
        stack_info: bool = False,
        stacklevel: int = 1,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            text = str(exc.message).strip().splitlines()
            self.info(
                "refused a malformed HTTP request (%d): %s", exc.code, text[0][:200] if text else ""
            )
            return
        super().exception(
            msg, *args, exc_info=exc_info, stack_info=stack_info, stacklevel=stacklevel,
            extra=extra,
        )  # fmt: skip


def server_logger() -> logging.Logger:
    """A logger for ``web.AppRunner``/``ServerRunner(logger=...)``; its records propagate
    as ``aiohttp.server``'s do (and so through the redacting handler)."""
    logger = _ServerLogger("aiohttp.server")
    logger.parent = logging.getLogger("aiohttp.server")
    return logger


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's default (``100 Continue`` for ``100-continue``) without echoing the
    header: any other value is a 417."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the final answer has not started yet
        return None
    return web.json_response({"error": "unsupported Expect header"}, status=417)
