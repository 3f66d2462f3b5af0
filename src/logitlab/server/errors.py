"""The server's errors: OpenAI error objects, the app's exception handlers, and the decoding drivers'
ParamError fields renamed to the request's."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling import ParamError
from .runner import QueueFull
from .sandbox import SandboxError

log = logging.getLogger("logitlab.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


RETRY_AFTER_S = 1  # a full queue drains by a few rows per decode step: a second later there is usually room


def queue_full(e: Exception) -> APIError:
    """429 for a full queue (or a full worker pool), with ``Retry-After`` as OpenAI's API sends it."""
    return APIError(429, str(e), type_="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def sandbox_refusal(e: SandboxError) -> APIError:
    if e.kind == "busy":
        return queue_full(e)
    return APIError(503, f"the server cannot take this request now ({e.kind}: {e.message})", type_="server_error",
                    code="unavailable")


_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "must be a string or a list of strings",
    "tool_choice": "must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
}


def _validation_error(e: ValidationError) -> APIError:
    errs = e.errors(include_url=False)
    for er in errs:
        if er["type"] == "extra_forbidden":
            name = ".".join(str(p) for p in er["loc"])
            return APIError(400, f"Unrecognized request argument supplied: {name}", param=name,
                            code="unknown_parameter")
    er = errs[0]
    loc = [str(p) for p in er["loc"]]
    field = loc[0] if loc else None
    if er["type"] == "missing":
        return APIError(400, f"{'.'.join(loc)}: a value is required", param=field, code="missing_parameter")
    if field in _UNION_HINTS and len(loc) >= 1:
        return APIError(400, f"{field}: {_UNION_HINTS[field]}", param=field, code="invalid_type")
    path = ".".join(p for p in loc if not any(c in p for c in "[]"))
    return APIError(400, f"{path or field}: {er['msg']}", param=field, code="invalid_type")


def add_error_handlers(app: FastAPI) -> None:
    """Every error a route raises answered as an OpenAI error object (a 500 means a bug in logitlab)."""
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(request, e: QueueFull):
        return await _api_error(request, queue_full(e))

    @app.exception_handler(SandboxError)
    async def _sandbox_error(request, e: SandboxError):  # a worker pool full or closed (sandbox.py)
        return await _api_error(request, sandbox_refusal(e))

    @app.exception_handler(ParamError)
    async def _param_error(request, e: ParamError):
        return error_response(400, str(e), param=getattr(e, "field", None), code="invalid_value")

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request, e: RequestValidationError):
        return error_response(400, "invalid request", code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            return error_response(404, f"Unknown route: {request.method} {request.url.path}",
                                  code="not_found")
        if e.status_code == 405:
            return error_response(405, f"Method {request.method} is not allowed on {request.url.path}",
                                  code="method_not_allowed")
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", type_="server_error")


# the drivers' parameter names -> the request fields they come from
_DRIVER_PARAM = {"regex": "guided_regex", "grammar": "guided_grammar", "choice": "guided_choice",
                 "json_schema": "guided_json", "json_object": "response_format", "constraint": "guided_json",
                 "contrastive_amateur": "contrastive", "contrastive_alpha": "contrastive",
                 "amateur_temperature": "contrastive", "num_speculative_tokens": "speculative"}


class _driver_errors:
    """Rename the drivers' ParamError fields to the request's (``regex`` -> ``guided_regex``, ...);
    ``rf``: the request has a response_format (a schema then comes from it, not from guided_json)."""

    def __init__(self, rf=None):
        self.rf = rf

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if isinstance(e, ParamError):
            field = _DRIVER_PARAM.get(e.field, e.field)
            if self.rf is not None and field in ("guided_json",):
                field = "response_format"
            if field != e.field:
                raise ParamError(field, e.reason) from None
        return False
