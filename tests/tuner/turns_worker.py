"""A stand-in for the trial worker that speaks tuner/turns.py's protocol: "requests" of 10 ms
(sleeps) while its pace lets it, each one's start and end written into its perf dump. Job fields:
"crash" ("before": exit 1 before connecting; "during": after its first slot)."""

import json
import sys
import time
from pathlib import Path

from dittune.tuner.turns import Pace

job = json.loads(Path(sys.argv[1]).read_text())
if job.get("crash") == "before":
    sys.exit(1)
time.sleep(job.get("load_s", 0.0))
pace, spans = Pace(job["turns"]), []
while pace(len(spans)):
    if job.get("crash") == "during" and len(pace.slots) == 2:
        sys.exit(1)
    t = time.time()
    time.sleep(0.01)
    spans.append((t, time.time()))
Path(job["perf_dump_path"]).write_text(json.dumps({"name": job["name"], "spans": spans, "slots": pace.slots}))
