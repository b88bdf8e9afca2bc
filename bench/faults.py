"""Faults under steady load, in one run: a worker SIGKILLed, a gateway SIGKILLed, the
broker restarted, Redis restarted.

    python bench/faults.py            # ~2 minutes; table + bench/results/faults.json
    python bench/faults.py --quick    # shorter pauses between the faults

Two gateways and two demo-model workers run on a RabbitMQ node and a redis-server of
this run's own (services.private_servers; Redis with AOF, as the README asks), so
nothing else on the machine sees the outages. Clients keep asking greedy questions
(every other one streamed) through either gateway; every answer is compared with the
reference answer to the same question taken before the faults, so a mixed, repeated
or partial text counts as lost, never as answered.

Each request ends as one of:
- answered: the whole answer, equal to the reference;
- refused:  an HTTP error with the standard body before anything was accepted (a 503
            with Retry-After while the broker or Redis is away), or no connection to
            that gateway at all (it is dead): the client knows to retry elsewhere;
- failed:   accepted, then ended with a clear error (an `error` event);
- cut:      accepted, then its gateway's connection broke (that gateway was killed);
- lost:     accepted, then nothing clear: a wrong or partial answer, a stream that
            ended without `done` or `error`, or no answer by its deadline. Must be 0.
Per fault: how long its action took (a restart is down, then up), how long clients
saw errors, and recovery: from the action's end (the process killed, the server
back) to the first whole answer to a request sent after it. The baseline is the
same load before the first fault (answers/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.launcher import MeshProcesses, until_ready
from services.private_servers import PrivateRabbit, PrivateRedis

PROMPTS = [
    "What is the four-tier handoff system?",
    "What does the phone do?",
    "Why is the session log append-only?",
    "What should the briefing contain?",
]
MAX_TOKENS = 48
CLIENTS = 4
REQUEST_TIMEOUT_S = 60
RESULTS = Path(__file__).parent / "results"


@dataclass
class Request:
    client: int
    gateway: int
    streamed: bool
    started: float
    ended: float = 0.0
    outcome: str = ""
    detail: str = ""


class Mesh:
    def __init__(self, root: Path) -> None:
        self.rabbit = PrivateRabbit(root / "rabbit")
        self.store = PrivateRedis(root / "redis")
        self.api_key = secrets.token_urlsafe(16)
        self.ports = [_port(), _port()]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
            "MESH_NAMESPACE": f"bench-faults-{secrets.token_hex(3)}",
            "MESH_AMQP_URL": self.rabbit.url,
            "MESH_REDIS_URL": self.store.url,
            "MESH_API_KEY": self.api_key,
            "MESH_HTTP_HOST": "127.0.0.1",
            "MESH_CAPACITY": "4",
            "MESH_HEARTBEAT_S": "0.5",
            "MESH_RATE_LIMIT_PER_MINUTE": "0",
            "MESH_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
            "MESH_LOG_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",  # two workers on two cores
        }
        self.processes = MeshProcesses(env, "127.0.0.1", self.ports[0], output=root / "logs")
        self.headers = {"Authorization": f"Bearer {self.api_key}"}

    def url(self, gateway: int) -> str:
        return f"http://127.0.0.1:{self.ports[gateway]}"

    def start_gateway(self, index: int) -> None:
        self.processes.start_process(
            f"gateway{index}", "gateway", {"MESH_HTTP_PORT": str(self.ports[index])}
        )

    def start_worker(self, index: int) -> None:
        self.processes.start_process(
            f"worker{index}", "inference_worker", {"MESH_WORKER_ID": f"worker{index}"}
        )

    def kill(self, name: str) -> None:
        child = self.processes.children.pop(name)
        child.kill()
        child.wait()

    async def ready(self, gateway: int, timeout_s: float = 180) -> None:
        await until_ready(self.url(gateway), timeout_s)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def body(prompt: str) -> dict[str, object]:
    return {"message": prompt, "temperature": 0, "max_tokens": MAX_TOKENS}


async def ask(
    client: httpx.AsyncClient, mesh: Mesh, record: Request, prompt: str, reference: str
) -> None:
    url = mesh.url(record.gateway)
    accepted = False
    try:
        if not record.streamed:
            response = await client.post(f"{url}/chat", json=body(prompt), headers=mesh.headers)
            accepted = True
            if response.status_code != 200:
                record.outcome, record.detail = "refused", _code(response.text)
            elif response.json()["response"] == reference:
                record.outcome = "answered"
            else:
                record.outcome, record.detail = "lost", "wrong answer"
            return
        async with client.stream(
            "POST", f"{url}/chat/stream", json=body(prompt), headers=mesh.headers
        ) as response:
            if response.status_code != 200:
                record.outcome, record.detail = "refused", _code((await response.aread()).decode())
                return
            accepted = True
            text, last, error = [], "", ""
            async for block in _events(response):
                event, data = block
                last = event
                if event == "chunk":
                    text.append(data.get("text", ""))
                elif event == "error":
                    error = data.get("error", {}).get("code", "")
            if last == "done":
                ok = "".join(text) == reference
                record.outcome = "answered" if ok else "lost"
                record.detail = "" if ok else "wrong answer"
            elif last == "error":
                record.outcome, record.detail = "failed", error
            else:
                record.outcome, record.detail = "lost", "ended without done or error"
    except httpx.TimeoutException:
        record.outcome, record.detail = "lost", "no answer by the deadline"
    except httpx.ConnectError:
        record.outcome, record.detail = "refused", "gateway down"
    except httpx.HTTPError as exc:
        # A plain request was sent whole before its answer was due: its gateway had it.
        cut = accepted or not record.streamed
        record.outcome, record.detail = ("cut" if cut else "refused"), type(exc).__name__
    finally:
        record.ended = time.monotonic()


async def _events(response: httpx.Response):  # type: ignore[no-untyped-def]
    buffer = ""
    async for piece in response.aiter_text():
        buffer += piece
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "event" in fields:
                yield fields["event"], json.loads(fields.get("data") or "{}")


def _code(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return text[:60]


async def load(
    mesh: Mesh, references: dict[str, str], stop: asyncio.Event, records: list[Request]
) -> None:
    down_until = [0.0, 0.0]  # a gateway that refused connections is skipped a moment

    async def client_loop(index: int) -> None:
        # Connections idle longer than uvicorn keeps them (5 s) are not reused: a POST
        # on one the server just closed would fail for a reason no fault caused.
        limits = httpx.Limits(keepalive_expiry=2)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S + 15, limits=limits) as client:
            turn = 0
            while not stop.is_set():
                prompt = PROMPTS[(index + turn) % len(PROMPTS)]
                gateway = (index + turn) % 2
                if down_until[gateway] > time.monotonic():
                    gateway = 1 - gateway
                record = Request(index, gateway, streamed=turn % 2 == 1, started=time.monotonic())
                records.append(record)
                await ask(client, mesh, record, prompt, references[prompt])
                if record.detail == "gateway down":
                    down_until[gateway] = time.monotonic() + 1.0
                if record.outcome == "refused":
                    await asyncio.sleep(0.2)  # as a client honouring Retry-After would
                turn += 1

    await asyncio.gather(*(client_loop(i) for i in range(CLIENTS)))


async def run(quick: bool) -> dict[str, object]:
    settle_s = 8.0 if quick else 15.0
    root = Path(tempfile.mkdtemp(prefix="mesh-faults-"))
    mesh = Mesh(root)
    faults: list[dict[str, object]] = []
    records: list[Request] = []
    try:
        await asyncio.to_thread(mesh.rabbit.start)
        await asyncio.to_thread(mesh.store.start)
        for index in (0, 1):
            mesh.start_worker(index)
            mesh.start_gateway(index)
        await asyncio.gather(mesh.ready(0), mesh.ready(1))
        references = {}
        async with httpx.AsyncClient(timeout=120) as client:
            for prompt in PROMPTS:
                answer = await client.post(
                    f"{mesh.url(1)}/chat", json=body(prompt), headers=mesh.headers
                )
                if answer.status_code != 200:
                    raise RuntimeError(f"reference answer failed: {answer.text}")
                references[prompt] = answer.json()["response"]
        stop = asyncio.Event()
        t0 = time.monotonic()
        load_task = asyncio.create_task(load(mesh, references, stop, records))

        async def fault(name: str, action: object, then: object | None = None) -> None:
            await asyncio.sleep(settle_s)
            at = time.monotonic()
            await asyncio.to_thread(action)  # type: ignore[arg-type]
            done = time.monotonic()
            print(f"  {at - t0:6.1f} s  {name}", flush=True)
            if then is not None:
                await asyncio.sleep(3)
                await asyncio.to_thread(then)  # type: ignore[arg-type]
            faults.append({"fault": name, "at": at, "back": done, "took_s": round(done - at, 2)})

        print("faults (seconds into the load):")
        await fault("worker SIGKILL", lambda: mesh.kill("worker0"), lambda: mesh.start_worker(0))
        await fault("gateway SIGKILL", lambda: mesh.kill("gateway0"), lambda: mesh.start_gateway(0))
        await fault("broker restart", lambda: mesh.rabbit.restart(down_s=2))
        await fault("redis restart", lambda: mesh.store.restart(down_s=2))
        await asyncio.sleep(settle_s)
        stop.set()
        await asyncio.wait_for(load_task, REQUEST_TIMEOUT_S + 30)
    finally:
        mesh.processes.stop()
        mesh.store.stop()
        mesh.rabbit.shutdown()
    return summarize(records, faults, t0, root)


def summarize(
    records: list[Request], faults: list[dict[str, object]], t0: float, root: Path
) -> dict[str, object]:
    outcomes = ["answered", "refused", "failed", "cut", "lost"]
    totals = {name: sum(r.outcome == name for r in records) for name in outcomes}
    accepted = sum(r.outcome in ("answered", "failed", "cut", "lost") for r in records)
    first = float(faults[0]["at"]) if faults else time.monotonic()  # type: ignore[arg-type]
    steady = [r for r in records if r.ended <= first and r.outcome == "answered"]
    baseline = len(steady) / max(first - t0, 1e-9)
    rows = []
    bounds = [float(f["at"]) for f in faults] + [float("inf")]  # type: ignore[arg-type]
    for fault, end in zip(faults, bounds[1:], strict=True):
        at, back = float(fault["at"]), float(fault["back"])  # type: ignore[arg-type]
        window = [r for r in records if at <= r.started < end]
        # From the fault's end (the process killed, the server back) to the first whole
        # answer to a request sent after it; and how long clients saw errors.
        answered_after = [r.ended for r in window if r.outcome == "answered" and r.started >= back]
        recovery = min(answered_after) - back if answered_after else None
        errors = [r for r in window if r.outcome != "answered"]
        hit = [r for r in records if r.started < at < r.ended]  # in flight at the fault
        error_window = (
            max(r.ended for r in errors) - min(r.started for r in errors) if errors else 0
        )
        rows.append(
            {
                "fault": fault["fault"],
                "at_s": round(at - t0, 1),
                "action_took_s": fault["took_s"],
                **{name: sum(r.outcome == name for r in window) for name in outcomes},
                "recovered_after_s": None if recovery is None else round(recovery, 2),
                "errors_for_s": round(error_window, 2),
                "in_flight_at_fault": {
                    name: sum(r.outcome == name for r in hit)
                    for name in outcomes
                    if any(r.outcome == name for r in hit)
                },
                "details": sorted({f"{r.outcome}:{r.detail}" for r in window if r.detail}),
            }
        )
    latencies = [r.ended - r.started for r in records if r.outcome == "answered"]
    return {
        "requests": len(records),
        "accepted": accepted,
        **totals,
        "baseline_answers_per_s": round(baseline, 2),
        "answer_latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "faults": rows,
        "logs": str(root / "logs"),
        "lost_details": [asdict(r) for r in records if r.outcome == "lost"],
    }


def show(result: dict[str, object]) -> None:
    print(
        f"\n{result['requests']} requests, {result['accepted']} accepted: "
        f"{result['answered']} answered in full, {result['refused']} refused (clear error), "
        f"{result['failed']} failed with a clear error, {result['cut']} cut with their "
        f"gateway, {result['lost']} lost"
    )
    print(f"baseline before the faults: {result['baseline_answers_per_s']} answers/s")
    header = f"{'fault':16} {'at s':>6} {'took s':>6} {'answered':>8} {'refused':>7} "
    print(header + f"{'failed':>6} {'cut':>4} {'lost':>4} {'errors for':>10} {'recovered':>10}")
    for row in result["faults"]:  # type: ignore[attr-defined]
        recovered = row["recovered_after_s"]
        print(
            f"{row['fault']:16} {row['at_s']:6.1f} {row['action_took_s']:6.1f} "
            f"{row['answered']:8} {row['refused']:7} {row['failed']:6} {row['cut']:4} "
            f"{row['lost']:4} {row['errors_for_s']:9.2f}s "
            f"{'-' if recovered is None else f'{recovered:.2f} s':>10}"
        )
        flight = ", ".join(f"{n} {name}" for name, n in row["in_flight_at_fault"].items())
        print(f"{'':18}in flight at the fault: {flight or 'none'}")
        for detail in row["details"]:
            print(f"{'':18}{detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not (PrivateRabbit.available() and PrivateRedis.available()):
        sys.exit("bench/faults.py: needs rabbitmq-server and redis-server (Debian's packages)")
    result = asyncio.run(run(args.quick))
    show(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {RESULTS / 'faults.json'}")


if __name__ == "__main__":
    main()
