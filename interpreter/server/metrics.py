"""`GET /metrics`: the manager's Prometheus registry (interpreter/metrics.py) in the text format.

Behind the token like everything else, unless `vmcell serve --metrics-public` (a scraper on a
trusted network then needs no secret; the figures name no session, code or file).
"""

from __future__ import annotations

from ..metrics import CONTENT_TYPE_LATEST
from .base import BaseHandler


class MetricsHandler(BaseHandler):
    def prepare(self) -> None:
        if not self.settings.get("vmcell_metrics_public"):
            super().prepare()

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.manager.metrics.render())


METRICS_ROUTES = [(r"/metrics", MetricsHandler)]
