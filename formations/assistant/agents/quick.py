#!/usr/bin/env python3
"""The quick example agent: answers at once by echoing the message back.

muxi-rt runs it with the formation folder as working directory and writes the
request to stdin as one JSON document (``message``, ``request_id``, ``user_id``,
``attempt``, ...). The answer is one JSON line on stdout: ``{"result": "..."}``.
"""

import json
import sys


def main() -> int:
    request = json.load(sys.stdin)
    message = request.get("message", "")
    print(json.dumps({"result": f"You said: {message}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
