#!/usr/bin/env python3
"""Times GET of the dashboard and the endpoints it polls against a running
inletd: median, p99 and max over N requests, on one kept-alive connection
and (for the page) on a new connection each time.

    python3 benches/page_latency.py [http://127.0.0.1:5015] [N]
"""
import http.client
import statistics
import sys
import time
from urllib.parse import urlsplit

URL = urlsplit(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5015")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 500
PATHS = ["/", "/dashboard.js", "/dashboard.css", "/stats/summary", "/stats/rate",
         "/stats/windows", "/stats/dau", "/stats/top-events?limit=10",
         "/stats/retention?window_type=daily&windows=7&start_date=2026-11-27"]


def measure(path, fresh):
    conn = None
    times, size = [], 0
    for _ in range(N):
        if conn is None or fresh:
            conn = http.client.HTTPConnection(URL.hostname, URL.port or 80)
        start = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        times.append((time.perf_counter() - start) * 1000)
        size = len(body)
        if fresh:
            conn.close()
    times.sort()
    how = "new connection each" if fresh else "kept alive"
    print(f"{path:<70} {size:>6} B  median {statistics.median(times):.3f} ms  "
          f"p99 {times[int(N * 0.99) - 1]:.3f} ms  max {times[-1]:.3f} ms  ({how})")


for p in PATHS:
    measure(p, fresh=False)
measure("/", fresh=True)
