"""What every HTTP handler shares: token auth, JSON bodies, and errors as JSON {reason, message}."""

from __future__ import annotations

import hmac
import logging

import orjson
import tornado.web

from ..errors import SessionGone, VmcellError

log = logging.getLogger("vmcell.server")


class BadRequest(tornado.web.HTTPError):
    def __init__(self, message: str):
        super().__init__(400, reason="Bad Request", log_message=message)


def token_matches(request, token: str) -> bool:
    """`Authorization: token T` or `Bearer T`, or `?token=T` (what Jupyter clients send)."""
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() not in ("token", "bearer"):
        given = ""
    given = given.strip() or request.query_arguments.get("token", [b""])[0].decode(errors="replace")
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


class BaseHandler(tornado.web.RequestHandler):
    # A session that ended is 410 Gone on vmcell's own API; Jupyter's kernel API says 404 for a
    # kernel that is no more (jupyter_server's gateway client treats 404 as "gone", anything else as
    # a failure), so its handlers override this. The message names the cause either way.
    gone_status = 410
    @property
    def manager(self):
        return self.settings["vmcell_manager"]

    def prepare(self) -> None:
        if not token_matches(self.request, self.settings["vmcell_token"]):
            raise tornado.web.HTTPError(401, reason="Unauthorized",
                                        log_message="missing or wrong token: send `Authorization: token <T>`")

    def check_xsrf_cookie(self) -> None:
        pass  # token auth only: no cookies, so no XSRF

    def json_body(self) -> dict:
        if not self.request.body:
            return {}
        try:
            body = orjson.loads(self.request.body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def write_json(self, data, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(data))

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, tornado.web.HTTPError):
            message = exc.log_message or self._reason
        elif isinstance(exc, VmcellError):
            message = str(exc)
        else:
            message = "internal error (see the server log)"
        body = {"reason": self._reason, "message": message}
        if isinstance(exc, VmcellError):
            body["error"] = type(exc).__name__  # the SDK raises the matching type
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(body))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, VmcellError):  # each failure type carries its status (interpreter/errors.py)
            status = self.gone_status if isinstance(e, SessionGone) else e.http_status
            if status >= 500:
                log.warning("%s %s: %s", self.request.method, self.request.path, e)
            self.send_error(status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)


def parse_typed(body: dict, name: str, kind, default=None, check=None):
    """A field of a JSON body, type-checked: bad input gets a clear 400, never a 500."""
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRequest(f"`{name}` must be {names}")
    if check is not None and not check(value):
        raise BadRequest(f"`{name}` is out of range")
    return value


def parse_env(body: dict, name: str = "env") -> dict[str, str] | None:
    env = parse_typed(body, name, dict)
    if env is not None and not all(isinstance(k, str) and k and isinstance(v, str) for k, v in env.items()):
        raise BadRequest(f"`{name}` must map non-empty strings to strings")
    return env
