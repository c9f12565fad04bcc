"""Ray driver sessions: one per pytest process.

Ray does not support a second driver session in a process whose first one left
threads behind (Serve's router loop, the GCS client's IO thread): they keep
pointing into the torn-down core worker, and the process can crash, at the
latest when it exits (ray-project/ray#31145). `make test` runs each module that
starts Ray in its own pytest process; a plain `pytest` run starts the first and
skips the others with this reason.
"""

from __future__ import annotations

import pytest

_started: list[str] = []


def one_ray_session(module: str) -> None:
    """Call before ray.init in a module's fixture."""
    if _started:
        pytest.skip(
            f"this process already ran a Ray session ({_started[0]}); a second one can crash "
            f"it (ray-project/ray#31145): run `pytest {module}` on its own (make test does)"
        )
    _started.append(module)
