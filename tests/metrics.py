"""Reading /metrics in tests with prometheus-client's own parser, so label order and number
formatting never matter."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics text, keyed by its name and its labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series is absent (a counter that never moved)."""
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def series(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """All samples of one name, with their labels, in the order the text gives them."""
    return [
        (dict(labels), found)
        for (sample_name, labels), found in samples(text).items()
        if sample_name == name
    ]
