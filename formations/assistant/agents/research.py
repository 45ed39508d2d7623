#!/usr/bin/env python3
"""The slow example agent: "researches" in five steps, reporting progress.

Each step takes about four seconds (about twenty in all); set the environment
variable ``MUXI_EXAMPLE_STEP_SECONDS`` to change that (``0`` for tests).

Protocol (see muxi-rt's command agent): the request arrives on stdin as one JSON
document; every stdout line is one JSON object, flushed at once:

- ``{"progress": 40, "step": "...", "total_steps": 5, "completed_steps": 2}``
  while working;
- ``{"result": "...", "artifacts": [{"name": "report.md", "content": "..."}]}``
  at the end.
"""

import json
import os
import sys
import time

TOTAL_STEPS = 5
DEFAULT_STEP_SECONDS = 4.0


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def step_seconds() -> float:
    raw = os.environ.get("MUXI_EXAMPLE_STEP_SECONDS", "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_STEP_SECONDS
    except ValueError:
        return DEFAULT_STEP_SECONDS


def main() -> int:
    request = json.load(sys.stdin)
    topic = request.get("message", "").strip() or "the topic"
    pause = step_seconds()

    findings = []
    for i in range(1, TOTAL_STEPS + 1):
        time.sleep(pause)
        findings.append(f"- Source {i}: a notable finding about {topic}.")
        emit({
            "progress": 20 * i,
            "step": f"Researching source {i}",
            "total_steps": TOTAL_STEPS,
            "completed_steps": i,
        })

    report = "\n".join([f"# Research report: {topic}", "", "## Findings", *findings, ""])
    emit({
        "result": f"Research on {topic} is done: {TOTAL_STEPS} sources reviewed. See report.md.",
        "artifacts": [{"name": "report.md", "content": report}],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
