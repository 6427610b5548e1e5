"""Where the packaged assets are, and the vendored libraries' paths (one place to upgrade)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TEMPLATES_DIR = HERE / "templates"
STATIC_URL = "/static"

SWAGGER = f"{STATIC_URL}/vendor/swagger-ui-5.35.0"
REDOC = f"{STATIC_URL}/vendor/redoc-2.5.4"
CHART_JS = f"{STATIC_URL}/vendor/chart.js-4.6.1/chart.umd.min.js"
FAVICON = f"{STATIC_URL}/app/favicon.svg"
