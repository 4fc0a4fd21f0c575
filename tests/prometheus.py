"""Reading the gate's /metrics text in tests: one helper, strict about names.

`metric(text, 'safeclip_requests_total{route="chat"}')` is the sum of every series of that metric whose
labels include the given ones (PromQL's `sum(...)` over a selector). A metric name the text does not
declare, or a label name none of its series carries, is an AssertionError: a typo must fail the test, not
read as 0 (a labelled counter asked for by its bare name used to read as 0 whatever it counted).
"""

from __future__ import annotations

import re

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"(?:,|$)')
# A histogram declares `name`; its samples are name_bucket, name_sum and name_count.
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    at = 0
    while at < len(text):
        match = _LABEL.match(text, at)
        assert match, f"cannot parse labels {text!r} at {text[at:]!r}"
        out[match["key"]] = match["value"].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        at = match.end()
    return out


def samples(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(declared metric -> type, every sample as (name, labels, value)) of an exposition text."""
    declared: dict[str, str] = {}
    found = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            declared[name] = kind
        elif line and not line.startswith("#"):
            match = _SAMPLE.match(line)
            assert match, f"not a metrics sample: {line!r}"
            found.append((match["name"], _labels(match["labels"] or ""), float(match["value"])))
    return declared, found


def _family(name: str, declared: dict[str, str]) -> str | None:
    if name in declared:
        return name
    for suffix in _HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and declared.get(base) == "histogram":
            return base
    return None


def metric(text: str, selector: str) -> float:
    """The sum over the series `selector` (`name` or `name{label="value",...}`) picks; 0 when the metric is
    declared but no series of it has those label values yet (a counter that never counted)."""
    name, _, rest = selector.partition("{")
    wanted = _labels(rest.removesuffix("}")) if rest else {}
    declared, found = samples(text)
    assert _family(name, declared), f"no metric {name!r} in the text; declared: {sorted(declared)}"
    series = [(labels, value) for n, labels, value in found if n == name]
    carried = {key for labels, _ in series for key in labels}
    unknown = sorted(set(wanted) - carried)
    assert not series or not unknown, f"{name} has no label(s) {unknown}; its series carry {sorted(carried)}"
    return sum(value for labels, value in series if all(labels.get(k) == v for k, v in wanted.items()))
