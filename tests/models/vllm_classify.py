"""Runs vLLM's pooling runner (`classify`) on a checkpoint; prints probabilities as JSON.

A script rather than in-process: vLLM spawns engine processes, and its entry
point must be guarded by `if __name__ == "__main__"`.
"""

from __future__ import annotations

import gc
import json
import sys


def main() -> None:
    from vllm import LLM

    path, texts = sys.argv[1], json.loads(sys.argv[2])
    # On CPU, gpu_memory_utilization is the share of RAM vLLM reserves: keep it small.
    llm = LLM(model=path, runner="pooling", gpu_memory_utilization=0.05, max_model_len=128,
              enforce_eager=True)  # fmt: skip
    probs = [o.outputs.probs for o in llm.classify(texts)]
    print("RESULT " + json.dumps(probs), flush=True)
    # Shut the engine down while the interpreter is whole: left to interpreter
    # exit, vLLM's CPU teardown sometimes aborts ("terminate called ...").
    del llm
    gc.collect()


if __name__ == "__main__":
    main()
