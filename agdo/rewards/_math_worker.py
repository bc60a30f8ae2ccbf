"""Child process behind :class:`agdo.rewards.math.MathVerifier`; not meant to be imported.

Protocol: one JSON object per line on stdin (``{"gold": str, "pred": str}``, both already wrapped so that
math-verify can extract them), one JSON line back per request (``{"equal": bool}``). A single ``"ready"``
line is written once math-verify has been imported. The parent owns every deadline: math-verify's own
signal-based timeouts are disabled here because the parent kills this process when a check runs too long.

Usage: ``python _math_worker.py MEMORY_LIMIT_BYTES``
"""

import sys

# Run as a script, sys.path[0] is this directory, whose math.py and code.py would shadow the standard library.
sys.path.pop(0)

import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402


def main() -> None:
    memory_limit = int(sys.argv[1])
    if memory_limit > 0:
        # A pathological expression (e.g. a power tower) must fail with MemoryError, not exhaust the host.
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    # The protocol owns the original stdout; anything a library prints goes to stderr (discarded by the parent).
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.disable(logging.CRITICAL)  # math-verify warns on every call with timeouts disabled

    from math_verify import parse, verify

    @functools.lru_cache(maxsize=4096)
    def parse_cached(text: str):
        # A GRPO group scores many completions against the same gold answer, so gold parses repeat.
        return parse(text, parsing_timeout=None)

    protocol.write("ready\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold = parse_cached(request["gold"])
            pred = parse(request["pred"], parsing_timeout=None)
            equal = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
        except Exception:  # noqa: BLE001 - any failure of the checker means "not verified"
            equal = False
        protocol.write(json.dumps({"equal": equal}) + "\n")


if __name__ == "__main__":
    main()
