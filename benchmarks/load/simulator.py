"""The SIMULATED frontier LLM: an OpenAI-compatible HTTP server on loopback.

tiergate's escalation tier calls it exactly as it calls a real provider (real
HTTP, structured output, usage-based cost). What it answers is set by explicit
parameters, printed with every report:

- accuracy: the share of texts it labels correctly. Whether a text is answered
  correctly is a hash of (seed, text), so every configuration of one run gets
  the same answer for the same text, as from a deterministic real model; a
  paraphrase gets the answer of the text it rewords (a model reads the intent,
  not the wording), so a semantic-cache hit is judged against what the frontier
  would have said, not against independent noise.
- latency: lognormal with the given median and 95th percentile.
- price: per million input and output tokens; the usage it reports counts
  ~4 characters per token of the prompt, and a fixed number of output tokens.

aiohttp serves it (already installed with Ray Serve): hundreds of calls wait
on their simulated latency at once, which a thread per call would not do well.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
from typing import Any

from tiergate.frontier import SimulatorParams, estimate_tokens, simulated_answer

HINTS = "\n\n(cheaper tiers"


def answer(
    params: SimulatorParams, gold: dict[str, tuple[str, str]], text: str, labels: list[str]
) -> str:
    """The label the simulated model gives ``text``: right with probability ``accuracy``."""
    truth, source = gold.get(text, ("oos", text))
    return simulated_answer(params.seed, params.accuracy, truth, source, labels)


def serve(params: SimulatorParams, gold: dict[str, tuple[str, str]], port_q: Any) -> None:
    """Runs the server (in its own process) and puts its port on ``port_q``."""
    from aiohttp import web

    rng = random.Random(params.seed)
    mu = math.log(params.latency_median_ms / 1000)
    sigma = (math.log(params.latency_p95_ms / 1000) - mu) / 1.6449
    calls = 0

    async def completions(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        body = await request.json()
        messages = body.get("messages") or []
        text = str(messages[-1].get("content", "")).partition(HINTS)[0] if messages else ""
        try:
            schema = body["response_format"]["json_schema"]["schema"]
            labels = list(schema["properties"]["label"]["enum"])
        except (KeyError, TypeError):
            labels = []
        await asyncio.sleep(rng.lognormvariate(mu, sigma))
        label = answer(params, gold, text, labels)
        message = {"role": "assistant", "content": json.dumps({"label": label})}
        prompt_tokens = sum(estimate_tokens(str(m.get("content", ""))) for m in messages)
        payload = {
            "id": f"sim-{calls}", "object": "chat.completion", "created": 0,
            "model": body.get("model", "simulated"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": params.output_tokens,
                      "total_tokens": prompt_tokens + params.output_tokens},
        }  # fmt: skip
        return web.json_response(payload)

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"calls": calls, "simulated": True})

    async def main() -> None:
        app = web.Application(client_max_size=4 << 20)
        app.router.add_post("/v1/chat/completions", completions)
        app.router.add_get("/stats", stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # our own socket: its port is known before serving
        await web.SockSite(runner, sock).start()
        port_q.put(sock.getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())
