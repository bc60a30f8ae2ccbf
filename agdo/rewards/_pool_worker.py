"""Child process of :class:`agdo.rewards.pool.RewardPool`; not meant to be imported.

Protocol: one JSON request per line on stdin, ``{"reward": name, "completions": [...], "fields": {...}}``;
one JSON reply per line, ``{"scores": [...]}`` or ``{"error": type, "message": str}``. A ``"ready"`` line
is written once the rewards are imported. Anything a library prints goes to stderr.
"""

import json
import os
import sys


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    from agdo.rewards import get_reward

    protocol.write("ready\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            scores = get_reward(request["reward"])(request["completions"], **request["fields"])
            reply = {"scores": [float(score) for score in scores]}
        except Exception as error:  # reported to the parent, which raises it there
            reply = {"error": type(error).__name__, "message": str(error)}
        protocol.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
