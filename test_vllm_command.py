"""Why would the worker's start-up fail here? Run this where the worker runs, and read.

    python test_vllm_command.py [--launch] [--timeout SECONDS] [--json] [--locate-only]

The name is the one worker-vllm's users know; the diagnostic itself is worker/diagnose/report.py.
"""

import sys

from worker.diagnose.report import main

if __name__ == "__main__":
    sys.exit(main())
