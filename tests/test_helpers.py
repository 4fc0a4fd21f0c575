"""The test helpers other tests lean on: a helper that reads 0 or passes on a typo makes its callers hollow."""

from __future__ import annotations

import pytest

from prometheus import metric
from safeclip.runtime.server.metrics import GateMetrics


@pytest.fixture
def text() -> str:
    m = GateMetrics()
    m.upstream_errors.inc("timeout")
    m.upstream_errors.inc("timeout")
    m.upstream_errors.inc("stream")
    m.requests.inc("chat", "error")
    m.requests.inc("moderations", "error")
    m.requests.inc("chat", "pass")
    m.batch.observe(3)
    m.batch.observe(5)
    return m.render()[0].decode()


def test_a_bare_name_sums_every_labelled_series(text):
    assert metric(text, "safeclip_upstream_errors_total") == 3
    assert metric(text, "safeclip_requests_total") == 3


def test_a_selector_sums_the_series_it_matches(text):
    assert metric(text, 'safeclip_upstream_errors_total{kind="timeout"}') == 2
    assert metric(text, 'safeclip_requests_total{outcome="error"}') == 2
    assert metric(text, 'safeclip_requests_total{route="chat",outcome="error"}') == 1
    assert metric(text, "safeclip_batch_images_count") == 2 and metric(text, "safeclip_batch_images_sum") == 8


def test_a_declared_metric_without_series_is_zero(text):
    assert metric(text, "safeclip_fail_open_total") == 0
    assert metric(text, 'safeclip_upstream_errors_total{kind="connect"}') == 0


@pytest.mark.parametrize(
    "selector",
    ["safeclip_upstream_error_total", "safeclip_batch_images_total", 'safeclip_upstream_errors_total{kinds="stream"}'],
)
def test_a_typo_fails_instead_of_reading_zero(text, selector):
    with pytest.raises(AssertionError):
        metric(text, selector)
