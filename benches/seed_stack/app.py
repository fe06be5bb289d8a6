"""The seeds' intake stack, for benches/compare.sh.

FastAPI + redis-py (asyncio), as the systems inletd replaces do it: validate
the event with pydantic, then one EVALSHA of dedupe.lua (SET idem:<id> NX EX
86400 + XADD to the stream), and answer 202 {"status":"accepted"} or 200
{"status":"duplicate"} -- the same path, statuses and bodies as inletd's
POST /webhook/events, so examples/load drives both alike.

    SEED_REDIS_URL=redis://127.0.0.1:6379/0 \
        uvicorn app:app --app-dir benches/seed_stack --workers 2

Each uvicorn worker imports this module and gets its own client and
connection pool (redis-py's default: a connection per concurrent request).
"""

import os
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Response
from pydantic import BaseModel, ConfigDict

REDIS_URL = os.environ.get("SEED_REDIS_URL", "redis://127.0.0.1:6379/0")
STREAM = os.environ.get("SEED_STREAM", "events")
LUA = Path(__file__).with_name("dedupe.lua").read_text()


class Event(BaseModel):
    # Extra fields are kept, as a webhook receiver must.
    model_config = ConfigDict(extra="allow")

    event_id: str
    event_type: str
    user_id: str | None = None
    properties: dict[str, Any] = {}


app = FastAPI()
redis = aioredis.from_url(REDIS_URL)
# EVALSHA, falling back to EVAL (which loads it) on NOSCRIPT.
dedupe_append = redis.register_script(LUA)


@app.post("/webhook/events", status_code=202)
async def ingest(event: Event, response: Response) -> dict[str, str]:
    received_at_ms = int(time.time() * 1000)
    new = await dedupe_append(
        keys=[f"idem:{event.event_id}", STREAM],
        args=[event.model_dump_json(), received_at_ms],
    )
    if not new:
        response.status_code = 200
        return {"status": "duplicate", "event_id": event.event_id}
    return {"status": "accepted", "event_id": event.event_id}


@app.get("/health")
async def health() -> dict[str, str]:
    await redis.ping()
    return {"status": "ok"}
