"""Rules tier next to a Python `re` loop and ahocorasick-rs (to be written)."""

from benchmarks.micro.harness import Inputs, Row


def run(inputs: Inputs) -> list[Row]:
    return []
