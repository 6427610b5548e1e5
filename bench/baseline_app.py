"""The baseline `bench/api_load.py --baseline` measures trainplan against: a bare FastAPI route
that reads a finished plan's stored response from the same database (same engine settings) and
returns its bytes. No auth, no problem details, no schema: what the framework and the store cost.

    uvicorn --factory bench.baseline_app:create   (TRAINPLAN_DATABASE_URL names the store)
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Response
from sqlalchemy import text

from service.store.db import make_engine


def create() -> FastAPI:
    engine = make_engine(os.environ["TRAINPLAN_DATABASE_URL"])
    app = FastAPI()
    query = text("SELECT body FROM plans WHERE id = :id")

    @app.get("/v1/plans/{plan_id}")
    def read(plan_id: str) -> Response:
        with engine.connect() as conn:
            body = conn.execute(query, {"id": plan_id}).scalar()
        if body is None:
            return Response(status_code=404)
        return Response(body, media_type="application/json")

    return app
