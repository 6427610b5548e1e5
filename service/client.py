"""A small Python client for the trainplan API, on httpx."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

from service.schemas.plan import FINAL


class TrainplanError(RuntimeError):
    def __init__(self, problem: dict[str, Any]) -> None:
        super().__init__(problem.get("detail") or problem.get("title") or str(problem))
        self.problem = problem


class TrainplanClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> TrainplanClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {
                    "title": response.reason_phrase,
                    "status": response.status_code,
                    "detail": response.text[:500],
                }
            raise TrainplanError(body)
        return response.json()

    def submit(
        self, spec: dict[str, Any], idempotency_key: str | None = None, refresh: bool = False
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = dict(spec) | ({"refresh": True} if refresh else {})
        return self._json(self.http.post("/v1/plans", json=body, headers=headers))

    def get(self, plan_id: str, wait: float = 0) -> dict[str, Any]:
        return self._json(
            self.http.get(f"/v1/plans/{plan_id}", params={"wait": wait}, timeout=wait + 30)
        )

    def cancel(self, plan_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/plans/{plan_id}/cancel"))

    def list(self, **filters: Any) -> dict[str, Any]:
        return self._json(self.http.get("/v1/plans", params=filters))

    def wait(self, plan_id: str, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            plan = self.get(plan_id, wait=min(30.0, max(0.0, deadline - time.monotonic())))
            if plan["status"] in FINAL or time.monotonic() >= deadline:
                return plan

    def events(self, plan_id: str, reconnects: int = 5) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (event, data) from the plan's server-sent events until `end`. A dropped stream
        is resumed with `Last-Event-ID` where it broke (up to `reconnects` times in a row)."""
        last_id: str | None = None
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                for event, data, event_id in self._stream(plan_id, headers):
                    failures = 0
                    last_id = event_id or last_id
                    yield event, data
                    if event == "end":
                        return
                return  # 204: the end was seen already
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
                failures += 1
                if failures > reconnects:
                    raise

    def _stream(
        self, plan_id: str, headers: dict[str, str]
    ) -> Iterator[tuple[str, dict[str, Any], str | None]]:
        with self.http.stream(
            "GET", f"/v1/plans/{plan_id}/events", headers=headers, timeout=None
        ) as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            event, data, event_id = "message", "", None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
                elif not line and data:
                    yield event, json.loads(data), event_id
                    event, data, event_id = "message", "", None
