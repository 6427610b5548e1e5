"""RFC 9457 problem details for every error the API returns, never a bare 500 page."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.schemas.problem import problem

MEDIA_TYPE = "application/problem+json"
log = structlog.get_logger("trainplan.api")


def _problem_response(description: str, status: int, title: str, detail: str) -> dict[str, Any]:
    example = problem(f"http-{status}", title, detail, status)
    return {"description": description, "content": {MEDIA_TYPE: {"example": example}}}


# Errors any route can answer with, documented once for the whole API.
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "The body is not JSON: problem details naming the line and column",
        "content": {
            MEDIA_TYPE: {
                "example": problem(
                    "invalid-json",
                    "The body is not valid JSON",
                    "Expecting value at line 2, column 13 (character 24)",
                    400,
                    line=2,
                    column=13,
                    position=24,
                )
            }
        },
    },
    401: _problem_response(
        "Missing or wrong bearer token (auth_mode=token)", 401, "Unauthorized", "bearer token"
    ),
    413: _problem_response(
        "The body is over the server's limit (declared or streamed in chunks)",
        413,
        "Request too large",
        "over the limit",
    ),
    503: _problem_response(
        "The plan store is down or full (Retry-After says when to retry)",
        503,
        "The plan store is unavailable",
        "the database did not accept the request; nothing was changed, retry later",
    ),
    422: _problem_response(
        "Invalid parameters or body: problem details naming the field",
        422,
        "Invalid request",
        "see errors",
    ),
}


class ProblemException(Exception):
    def __init__(self, status: int, kind: str, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.body = problem(kind, title, detail, status, **extra)
        self.status = status
        self.headers: dict[str, str] | None = None

    def with_headers(self, headers: dict[str, str]) -> ProblemException:
        self.headers = headers
        return self

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ProblemException:
        """Raise an already built problem-details object as it is."""
        exc = cls.__new__(cls)
        Exception.__init__(exc, body["detail"])
        exc.body, exc.status, exc.headers = body, int(body["status"]), None
        return exc


def field_error(loc: Sequence[str | int], msg: str, kind: str) -> dict[str, Any]:
    """One entry of a 422's `errors`, in the shape FastAPI's validation errors are given."""
    return {"loc": list(loc), "field": ".".join(str(p) for p in loc), "msg": msg, "type": kind}


def problem_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        body, status_code=int(body["status"]), media_type=MEDIA_TYPE, headers=headers
    )


def _clean_errors(errors: Any, body: Any = None) -> list[dict[str, Any]]:
    out = []
    for err in errors:
        path, msg = spec_path(list(err.get("loc", ())), body), err.get("msg")
        out.append(field_error(path + _named_field(path, msg, body), msg, err.get("type")))
    return out


# A validator across fields (world_size against parallelism's degrees) fails at the object
# that holds them, and opens its message with the field at fault: "parallelism.tensor_parallel
# 3 x context_parallel 1 must divide world_size 4".
NAMED_FIELD = re.compile(r"(?:Value error, )?([a-z_]+(?:\.[a-z_]+)+) ")


def _named_field(path: list[Any], msg: Any, body: Any) -> list[Any]:
    """The field a cross-field error's message opens with, below `path`, where the client sent
    it: the error then names it rather than the object around it."""
    found = NAMED_FIELD.match(msg) if isinstance(msg, str) else None
    if found is None:
        return []
    node = body
    for step in path:
        node = node.get(step) if isinstance(node, dict) else None
    steps = found.group(1).split(".")
    for step in steps:
        if not isinstance(node, dict) or step not in node:
            return []
        node = node[step]
    return steps


UNION_TAGS = ("kind", "source")  # the spec's discriminators (data.kind, model.source, ...)


def spec_path(loc: list[Any], body: Any) -> list[Any]:
    """The error's path in the JSON the client sent. Pydantic's `loc` starts with `body` and
    names the member of a tagged union it tried (`data.image.height` for `data.height` of an
    image): a step that is not in the sent document, with more steps after it, is such a tag."""
    if loc[:1] == ["body"]:
        loc = loc[1:]
    path: list[Any] = []
    node, tagged = body, False  # tagged: this node's tag was passed (`layers` may be both)
    for i, step in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and isinstance(step, str):
            if not tagged and step in {node.get(tag) for tag in UNION_TAGS} - {None}:
                if last:
                    break  # the member's own validator failed: the error is the object's
                tagged = True
                continue  # the member of a tagged union pydantic tried: not in the document
            if step in node:
                node, tagged = node[step], False
            elif not last:
                continue  # a member of an untagged union, named by its type
            path.append(step)
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node, tagged = node[step], False
            path.append(step)
        else:
            path.extend(loc[i:])
            break
    return path


def validation_problem(errors: list[dict[str, Any]]) -> dict[str, Any]:
    fields = ", ".join(sorted({e["field"] for e in errors if e.get("field")})) or "the request"
    return problem(
        "validation-error",
        "The request is invalid",
        f"invalid: {fields}. {errors[0]['msg'] if errors else ''}".strip(),
        422,
        errors=errors,
    )


def allowed_methods(app: FastAPI, request: Request) -> str:
    """Every method served at this path, by any route, published or not (the dashboard's pages
    are not in the schema): each method is tried against the router as a request of it would
    be. Starlette names only the first matching route's, so a 405 on /v1/plans said
    `Allow: POST` although GET is served there."""
    return ", ".join(
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in app.router.routes
        )
    )


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")  # sorted


def invalid_json(errors: Sequence[Any], body: Any) -> dict[str, Any] | None:
    """A body that is not JSON is a 400 naming the line and column where parsing stopped
    (FastAPI reports it as a 422 at the character offset, as if it were a field)."""
    error = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if error is None:
        return None
    loc = list(error.get("loc", ()))
    offset = loc[-1] if loc and isinstance(loc[-1], int) else 0
    text = body if isinstance(body, str) else ""
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    reason = (error.get("ctx") or {}).get("error") or error.get("msg", "not JSON")
    return problem(
        "invalid-json",
        "The body is not valid JSON",
        f"{reason} at line {line}, column {column} (character {offset})",
        400,
        line=line,
        column=column,
        position=offset,
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        not_json = invalid_json(exc.errors(), exc.body)
        if not_json is not None:
            return problem_response(not_json)
        return problem_response(validation_problem(_clean_errors(exc.errors(), exc.body)))

    @app.exception_handler(ProblemException)
    async def _problem(_: Request, exc: ProblemException) -> JSONResponse:
        return problem_response(exc.body, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(app, request)
        title = {
            404: "Not found",
            405: "Method not allowed",
            401: "Unauthorized",
            413: "Request too large",
        }.get(exc.status_code, "HTTP error")
        return problem_response(
            problem(f"http-{exc.status_code}", title, str(exc.detail), exc.status_code),
            headers=headers or None,
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _store_down(request: Request, exc: Exception) -> JSONResponse:
        """The store is restarting, unreachable or out of space: nothing was written; retry."""
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0][:200]
        log.warning("api.store_unavailable", path=request.url.path, error=reason)
        body = problem(
            "store-unavailable",
            "The plan store is unavailable",
            f"the database did not accept the request ({reason}); nothing was changed, retry later",
            503,
        )
        return problem_response(body, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("api.unhandled", path=request.url.path, error=repr(exc)[:500])
        return problem_response(
            problem("internal", "Internal error", "the server failed to handle this request", 500)
        )
