"""A stand-in for a busy shared host: `python bench/busy_host.py CORE SECONDS` keeps CORE busy for
0.2-2 s, then idle for 0.2-3 s, at random, for SECONDS (docs/PERFORMANCE.md, eighth session)."""
import os, sys, time, random
core, secs = int(sys.argv[1]), float(sys.argv[2])
os.sched_setaffinity(0, {core})
random.seed(core)
end = time.time() + secs
while time.time() < end:
    b = time.time() + random.uniform(0.2, 2.0)
    while time.time() < b: pass
    time.sleep(random.uniform(0.2, 3.0))
