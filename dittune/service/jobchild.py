"""`python -m dittune.service.jobchild RC_FILE CMD...`: runs one tune job's command and writes its
exit status to RC_FILE, so that a service restarted while the job ran still learns how it ended.
SIGTERM and SIGINT are forwarded to the command (tune saves what it measured and stops)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    rc_file, cmd = Path(argv[0]), argv[1:]
    child = subprocess.Popen(cmd)

    def forward(signum, frame):
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = child.wait()
    tmp = rc_file.with_suffix(".rc.tmp")
    tmp.write_text(f"{rc}\n")
    os.replace(tmp, rc_file)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
