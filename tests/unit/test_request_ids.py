"""Request ids: unique, 32 hex digits, and a forked process never repeats its parent's."""

from __future__ import annotations

import os
import re
import sys

import pytest

from tiergate.engine import Request, new_request_id
from tiergate.policy import Tenant


def test_ids_are_unique_hex_and_each_request_gets_one() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    ids += [Request("hi", Tenant("t")).request_id for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_draws_a_new_prefix() -> None:
    parent = new_request_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, through the pipe
        try:
            os.write(write, new_request_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert re.fullmatch(r"[0-9a-f]{32}", child), child
    # Same counter state at the fork: only a fresh prefix keeps the two apart.
    assert child[:16] != parent[:16], (parent, child)
    assert sys.modules["tiergate.engine"].new_request_id()[:16] == parent[:16]
