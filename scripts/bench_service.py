"""Requests per second and p50/p99 latency of the HTTP service under a mixed read/write load, on SQLite
and on PostgreSQL, with no training running.

    python scripts/bench_service.py                       # both databases, 8 clients, 20 s each
    python scripts/bench_service.py --database postgresql --postgres postgresql://user@host/db
    python scripts/bench_service.py --clients 16 --seconds 30 --writes 0.3

For each database it starts `tailoredgen-train serve` (one uvicorn process, as a deployment runs one
replica) on 127.0.0.1 with a fresh data folder and database (PostgreSQL: a throwaway server on this
machine's binaries with its default, durable settings, unless --postgres is given), creates a project and a dataset, then `--clients`
threads send requests for `--seconds` after `--warmup` seconds: reads (GET /models, /projects/{id},
/datasets/{id}, /datasets/{id}/images) and writes (POST /projects, PUT /datasets/{id}) drawn with
probability `--writes`. Every request also counts against its token's rate in the database. Prints
one JSON line per database. Numbers go to docs/PERFORMANCE.md, never into tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import httpx  # noqa: E402

from tailoredgen_train.fixtures.postgres import PostgresServer, postgres_bin  # noqa: E402

TOKEN = "bench-token-0001"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(data_dir: Path, db_url: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    base = data_dir.parent / "no-base"  # the families load their weights only to train or generate
    command = [sys.executable, "-m", "tailoredgen_train", "serve", "--port", str(port), "--data-dir", str(data_dir),
               "--base", f"fibo={base}", "--rate-limit", "100000000", *(["--db", db_url] if db_url else [])]
    log = open(data_dir.parent / "serve.log", "ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "TAILOREDGEN_API_TOKENS": TOKEN})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise SystemExit(f"serve exited: {(data_dir.parent / 'serve.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("serve did not answer /healthz within 120 s")
        time.sleep(0.2)


def load(url: str, clients: int, seconds: float, warmup: float, writes: float) -> dict:
    with httpx.Client(base_url=f"{url}/tailored-gen", headers={"api_token": TOKEN}) as api:
        project = api.post("/projects", json={"project_name": "bench", "ip_medium": "illustration",
                                              "ip_type": "stylized_scene"}).json()["id"]
        dataset = api.post("/datasets", json={"project_id": project, "name": "bench",
                                              "training_version": "fibo"}).json()["id"]
    reads = ["/models", f"/projects/{project}", f"/datasets/{dataset}", f"/datasets/{dataset}/images"]
    started = time.monotonic()
    measure_from, until = started + warmup, started + warmup + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def client(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=f"{url}/tailored-gen", headers={"api_token": TOKEN}, timeout=60) as api:
            while (now := time.monotonic()) < until:
                if rng.random() < writes:
                    if rng.random() < 0.5:
                        call = lambda: api.post("/projects", json={  # noqa: E731
                            "project_name": f"p{i}", "ip_medium": "illustration", "ip_type": "stylized_scene"})
                    else:
                        call = lambda: api.put(f"/datasets/{dataset}", json={"name": f"d{i}"})  # noqa: E731
                else:
                    call = lambda: api.get(rng.choice(reads))  # noqa: E731
                response = call()
                took = time.monotonic() - now
                if now >= measure_from:
                    latencies[i].append(took)
                    errors[i] += response.status_code >= 400

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = sorted(t for per_client in latencies for t in per_client)
    return {"requests": len(every), "errors": sum(errors), "rps": round(len(every) / seconds, 1),
            "p50_ms": round(1000 * every[len(every) // 2], 2), "p99_ms": round(1000 * every[int(len(every) * 0.99)], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--postgres", help="a PostgreSQL URL to use (default: a throwaway server on this machine)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--writes", type=float, default=0.2, help="share of write requests")
    args = parser.parse_args(argv)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    for database in (("sqlite", "postgresql") if args.database == "both" else (args.database,)):
        with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
            server, db_url = None, None
            if database == "postgresql":
                if args.postgres:
                    db_url = args.postgres
                else:
                    bindir = postgres_bin()
                    if bindir is None:
                        raise SystemExit("no PostgreSQL binaries found: pass --postgres URL or install postgresql-15")
                    server = PostgresServer(bindir, durable=True).start()
                    db_url = server.new_database()
            process, url = start_service(Path(tmp) / "data", db_url)
            try:
                result = load(url, args.clients, args.seconds, args.warmup, args.writes)
            finally:
                process.terminate()
                process.wait(timeout=60)
                if server is not None:
                    server.stop()
        print(json.dumps({"database": database, "clients": args.clients, "seconds": args.seconds,
                          "writes": args.writes, **result, "machine": machine,
                          "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine
                          "postgres": "throwaway, default (durable) settings" if database == "postgresql"
                          and not args.postgres else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
