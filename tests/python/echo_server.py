#!/usr/bin/env python3
"""Echo test server written with Python grpcio, for Tern's interoperability tests.

Behaves like the tonic `echo-server` of the e2e crate, so the same checks run against either:
a gRPC stack other than tonic's must pass through Tern's sidecars unchanged too.

Usage: echo_server.py --listen 127.0.0.1:0 --name NAME   (needs the generated stubs on
PYTHONPATH). Prints "echo-server listening on ADDR" once bound; stops gracefully on SIGTERM.
"""

import argparse
import base64
import signal
import sys
import threading
import time
from concurrent import futures

import grpc

from tern.test.v1 import echo_pb2, echo_pb2_grpc

MAX_MESSAGE = 32 * 1024 * 1024
CODES = {code.value[0]: code for code in grpc.StatusCode}
TRAILERS = (
    ("x-echo-trailer", "done"),
    ("x-echo-trailer-bin", bytes([0xDE, 0xAD, 0xBE, 0xEF])),
)
# grpcio reports "no deadline" as a remaining time of many years.
NO_DEADLINE = 365 * 24 * 3600


def pattern(size):
    return bytes(i % 251 for i in range(size))


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.calls = 0
        self.cancelled = 0
        self.last_grpc_timeout = ""


class Echo(echo_pb2_grpc.EchoServicer):
    def __init__(self, name):
        self.name = name
        self.counters = Counters()

    def _observe(self, context):
        remaining = context.time_remaining()
        with self.counters.lock:
            self.counters.calls += 1
            # grpcio hides the grpc-timeout header; the deadline it derived from it stands in.
            if remaining is not None and remaining < NO_DEADLINE:
                self.counters.last_grpc_timeout = "%dm" % max(int(remaining * 1000), 0)
        seen = []
        for key, value in context.invocation_metadata():
            if isinstance(value, bytes):
                value = base64.b64encode(value).decode("ascii")
            seen.append("%s=%s" % (key, value))
        return seen

    def _cancelled(self):
        with self.counters.lock:
            self.counters.cancelled += 1

    def _wait(self, context, delay_ms):
        """Sleeps delay_ms; False (and counted) if the client went away meanwhile."""
        end = time.monotonic() + delay_ms / 1000.0
        while True:
            if not context.is_active():
                self._cancelled()
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.01))

    def _fail_if_asked(self, context, request):
        if request.fail_code != 0:
            code = CODES.get(request.fail_code, grpc.StatusCode.UNKNOWN)
            context.abort(code, request.message)

    def _reply(self, request, seen, seq):
        payload = pattern(request.reply_size) if request.reply_size > 0 else request.payload
        return echo_pb2.EchoReply(
            message=request.message, payload=payload, server=self.name, metadata=seen, seq=seq
        )

    def Unary(self, request, context):
        seen = self._observe(context)
        if not self._wait(context, request.delay_ms):
            return echo_pb2.EchoReply()
        self._fail_if_asked(context, request)
        context.set_trailing_metadata(TRAILERS)
        return self._reply(request, seen, 0)

    def ServerStream(self, request, context):
        seen = self._observe(context)
        self._fail_if_asked(context, request)
        for seq in range(1, request.count + 1):
            if not self._wait(context, request.delay_ms):
                return
            yield self._reply(request, seen, seq)
        context.set_trailing_metadata(TRAILERS)

    def ClientStream(self, request_iterator, context):
        seen = self._observe(context)
        joined = echo_pb2.EchoRequest()
        count = 0
        for request in request_iterator:
            count += 1
            joined.message += request.message
            joined.payload += request.payload
            joined.delay_ms = max(joined.delay_ms, request.delay_ms)
            if request.fail_code != 0:
                joined.fail_code = request.fail_code
        if not self._wait(context, joined.delay_ms):
            return echo_pb2.EchoReply()
        self._fail_if_asked(context, joined)
        context.set_trailing_metadata(TRAILERS)
        return self._reply(joined, seen, count)

    def BidiStream(self, request_iterator, context):
        seen = self._observe(context)
        seq = 0
        for request in request_iterator:
            seq += 1
            if not self._wait(context, request.delay_ms):
                return
            self._fail_if_asked(context, request)
            yield self._reply(request, seen, seq)
        context.set_trailing_metadata(TRAILERS)

    def Stats(self, request, context):
        with self.counters.lock:
            return echo_pb2.StatsReply(
                server=self.name,
                calls=self.counters.calls,
                cancelled=self.counters.cancelled,
                last_grpc_timeout=self.counters.last_grpc_timeout,
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--name", default="echo-py")
    args = parser.parse_args()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(args.name), server)
    port = server.add_insecure_port(args.listen)
    if port == 0:
        print("cannot bind %s" % args.listen, file=sys.stderr)
        return 1
    host = args.listen.rsplit(":", 1)[0]
    server.start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("echo-server listening on %s:%d" % (host, port), flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(grace=5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
