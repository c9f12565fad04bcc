"""`make serve` runs the demo until the server lands: it must keep working."""

import pytest

from tiergate import demo


def test_demo_routes_each_text_to_the_expected_tier(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    lines = {line.split("'")[1]: line for line in out.splitlines() if line.count("'") >= 2}
    assert "rules" in lines["I will call my lawyer about this chargeback"]
    assert "finance,legal" in lines["I will call my lawyer about this chargeback"]
    assert "track_order" in lines["where is my package, it is late"]
    assert "semantic cache" in lines["WHERE IS MY PACKAGE, IT IS LATE"]
    assert "escalate" in lines["what is the weather on mars"]
    assert "'hits': 1" in out
