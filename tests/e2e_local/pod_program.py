"""The process the node agent tests run in their pods (the "image" is this machine): a small HTTP server.

    python3 pod_program.py --host 0.0.0.0 --port 8080 [--ready-after S] [--exit-code N --exit-after S]
                           [--unhealthy] [--term-delay S] [--events FILE]

GET /health: 200 once --ready-after seconds passed (503 before); GET /alive: 200, or 500 with --unhealthy;
GET /env: the process's environment, working directory and argv as JSON. On SIGTERM it appends
"SIGTERM <unix time>" to --events and exits after --term-delay seconds. With --exit-code it prints a
fatal line and exits with that code after --exit-after seconds.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = time.time()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--exit-code", type=int)
    parser.add_argument("--exit-after", type=float, default=0.0)
    parser.add_argument("--unhealthy", action="store_true")
    parser.add_argument("--term-delay", type=float, default=0.0)
    parser.add_argument("--events")
    args = parser.parse_args()

    def record(event: str) -> None:
        print(event, flush=True)
        if args.events:
            with open(args.events, "a") as events:
                events.write(f"{event} {time.time()}\n")

    if args.exit_code is not None:
        time.sleep(args.exit_after)
        print("starting up", flush=True)
        print(f"fatal: cannot start: exit code {args.exit_code} requested", flush=True)
        sys.exit(args.exit_code)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                status = 200 if time.time() - STARTED >= args.ready_after else 503
                body = b"ok"
            elif self.path == "/alive":
                status, body = (500 if args.unhealthy else 200), b""
            elif self.path == "/env":
                status = 200
                body = json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv}).encode()
            else:
                status, body = 404, b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)

    def on_sigterm(signum: int, frame: object) -> None:
        record("SIGTERM")
        threading.Timer(args.term_delay, lambda: os._exit(0)).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    record(f"listening on {args.host}:{args.port}")
    server.serve_forever()


if __name__ == "__main__":
    main()
