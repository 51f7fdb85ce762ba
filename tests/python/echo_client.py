#!/usr/bin/env python3
"""Python grpcio client for Tern's interoperability tests.

Runs the gRPC transparency checks against an Echo server (usually through Tern's sidecars) and
exits non-zero, naming every check that failed and what differed.

Usage: echo_client.py --target ADDR --direct ADDR --server NAME
  --target  where calls go (a sidecar's upstream port, or the server itself)
  --direct  the server itself, for its Stats counters (never through a proxy)
  --server  the name every reply's `server` field must carry
"""

import argparse
import base64
import queue
import sys
import time
import traceback

import grpc

from tern.test.v1 import echo_pb2, echo_pb2_grpc

MAX_MESSAGE = 32 * 1024 * 1024
LARGE = 5 * 1024 * 1024
CALL_TIMEOUT = 5.0
UNICODE_MESSAGE = "paiement refusé ✗ 支付"
BIN_VALUE = bytes([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF])
TRAILER_BIN_VALUE = bytes([0xDE, 0xAD, 0xBE, 0xEF])


class Mismatch(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise Mismatch(message)


def pattern(size):
    return bytes(i % 251 for i in range(size))


def channel(addr):
    return grpc.insecure_channel(
        addr,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )


def eventually(limit, probe, what):
    """Polls probe() until it returns None; raises with the last observation after limit s."""
    deadline = time.monotonic() + limit
    while True:
        seen = probe()
        if seen is None:
            return
        if time.monotonic() >= deadline:
            raise Mismatch("%s not reached within %ss; last seen: %s" % (what, limit, seen))
        time.sleep(0.05)


def parse_grpc_timeout(value):
    units = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    expect(
        len(value) >= 2 and value[:-1].isdigit() and len(value) <= 9 and value[-1] in units,
        "bad grpc-timeout %r" % value,
    )
    return int(value[:-1]) * units[value[-1]]


class Checks:
    def __init__(self, target, direct, server):
        self.stub = echo_pb2_grpc.EchoStub(channel(target))
        self.stats_stub = echo_pb2_grpc.EchoStub(channel(direct))
        self.server = server

    def stats(self):
        return self.stats_stub.Stats(echo_pb2.StatsRequest(), timeout=CALL_TIMEOUT)

    def reply_ok(self, reply, message):
        expect(reply.message == message, "message %r, sent %r" % (reply.message, message))
        expect(reply.server == self.server, "answered by %r, expected %r" % (reply.server, self.server))

    def check_trailers(self, trailers, call):
        found = {key: value for key, value in (trailers or ())}
        expect(found.get("x-echo-trailer") == "done", "%s: trailers %r" % (call, found))
        expect(
            found.get("x-echo-trailer-bin") == TRAILER_BIN_VALUE,
            "%s: x-echo-trailer-bin %r" % (call, found.get("x-echo-trailer-bin")),
        )

    def unary(self):
        reply = self.stub.Unary(echo_pb2.EchoRequest(message="ping", payload=b"\x01\x02\x03"), timeout=CALL_TIMEOUT)
        self.reply_ok(reply, "ping")
        expect(reply.payload == b"\x01\x02\x03", "payload %r" % reply.payload)

    def server_stream(self):
        replies = list(self.stub.ServerStream(echo_pb2.EchoRequest(message="many", count=5), timeout=CALL_TIMEOUT))
        for reply in replies:
            self.reply_ok(reply, "many")
        seqs = [r.seq for r in replies]
        expect(seqs == [1, 2, 3, 4, 5], "replies with seq %r" % seqs)

    def client_stream(self):
        parts = [echo_pb2.EchoRequest(message=m, payload=bytes([i])) for i, m in enumerate("abcd")]
        reply = self.stub.ClientStream(iter(parts), timeout=CALL_TIMEOUT)
        self.reply_ok(reply, "abcd")
        expect(reply.seq == 4, "server counted %d messages, sent 4" % reply.seq)
        expect(reply.payload == b"\x00\x01\x02\x03", "payload %r" % reply.payload)

    def bidi_stream(self):
        # The next message goes out only after the previous reply came back.
        outgoing = queue.Queue()
        outgoing.put(echo_pb2.EchoRequest(message="m1"))
        call = self.stub.BidiStream(iter(outgoing.get, None), timeout=CALL_TIMEOUT)
        for i in range(1, 4):
            reply = next(call)
            self.reply_ok(reply, "m%d" % i)
            expect(reply.seq == i, "seq %d for message %d" % (reply.seq, i))
            outgoing.put(echo_pb2.EchoRequest(message="m%d" % (i + 1)) if i < 3 else None)
        rest = list(call)
        expect(rest == [], "extra items after the request stream ended: %r" % rest)
        self.check_trailers(call.trailing_metadata(), "bidi")

    def metadata(self):
        reply = self.stub.Unary(
            echo_pb2.EchoRequest(message="md"),
            metadata=[("x-tern-test", "hello, tern"), ("x-tern-test-bin", BIN_VALUE)],
            timeout=CALL_TIMEOUT,
        )
        seen = list(reply.metadata)
        expect("x-tern-test=hello, tern" in seen, "server did not see x-tern-test; saw %r" % seen)
        bins = [e.split("=", 1)[1] for e in seen if e.startswith("x-tern-test-bin=")]
        expect(bins, "server did not see x-tern-test-bin; saw %r" % seen)
        text = bins[0].rstrip("=")
        decoded = base64.b64decode(text + "=" * (-len(text) % 4))
        expect(decoded == BIN_VALUE, "x-tern-test-bin arrived as %r" % decoded)

    def trailers(self):
        _, call = self.stub.Unary.with_call(echo_pb2.EchoRequest(message="t"), timeout=CALL_TIMEOUT)
        self.check_trailers(call.trailing_metadata(), "unary")
        stream = self.stub.ServerStream(echo_pb2.EchoRequest(message="t", count=2), timeout=CALL_TIMEOUT)
        list(stream)
        self.check_trailers(stream.trailing_metadata(), "server_stream")

    def error_status(self):
        try:
            reply = self.stub.Unary(
                echo_pb2.EchoRequest(message=UNICODE_MESSAGE, fail_code=grpc.StatusCode.FAILED_PRECONDITION.value[0]),
                timeout=CALL_TIMEOUT,
            )
        except grpc.RpcError as err:
            expect(err.code() == grpc.StatusCode.FAILED_PRECONDITION, "code %s (%r)" % (err.code(), err.details()))
            expect(err.details() == UNICODE_MESSAGE, "message %r, sent %r" % (err.details(), UNICODE_MESSAGE))
            return
        raise Mismatch("expected FAILED_PRECONDITION, got OK %r" % reply)

    def large_messages(self):
        payload = bytes((i * 7) % 256 for i in range(LARGE))
        reply = self.stub.Unary(echo_pb2.EchoRequest(message="big", payload=payload), timeout=CALL_TIMEOUT)
        expect(reply.payload == payload, "5 MiB echo came back as %d bytes (or changed)" % len(reply.payload))
        reply = self.stub.Unary(echo_pb2.EchoRequest(message="big-reply", reply_size=LARGE), timeout=CALL_TIMEOUT)
        expect(reply.payload == pattern(LARGE), "asked for %d bytes, got %d (or wrong content)" % (LARGE, len(reply.payload)))

    def cancellation(self):
        before = self.stats()
        future = self.stub.Unary.future(echo_pb2.EchoRequest(message="slow", delay_ms=3000), timeout=CALL_TIMEOUT)

        def arrived():
            now = self.stats().calls
            return None if now > before.calls else "calls %d" % now

        # Cancel only once the server is working on the call, so the cancel is what is tested.
        eventually(5, arrived, "the call reaching the server")
        time.sleep(0.2)
        expect(not future.done(), "a 3 s call finished within 200 ms")
        future.cancel()

        def probe():
            now = self.stats().cancelled
            return None if now == before.cancelled + 1 else "cancelled %d (was %d)" % (now, before.cancelled)

        eventually(5, probe, "the server seeing the cancellation")

    def deadline(self):
        start = time.monotonic()
        try:
            reply = self.stub.Unary(echo_pb2.EchoRequest(message="late", delay_ms=2000), timeout=0.2)
        except grpc.RpcError as err:
            elapsed = time.monotonic() - start
            expect(err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, "code %s (%r)" % (err.code(), err.details()))
            expect(elapsed < 1.5, "the 200 ms deadline took %.3fs to expire" % elapsed)
            seen = self.stats().last_grpc_timeout
            timeout = parse_grpc_timeout(seen)
            # grpc core rounds the encoded timeout up (200 ms goes out as "201m").
            expect(0 < timeout <= 0.25, "server saw grpc-timeout %r, client set 200ms" % seen)
            return
        raise Mismatch("expected DEADLINE_EXCEEDED, got OK %r" % reply)


CHECKS = [
    "unary", "server_stream", "client_stream", "bidi_stream", "metadata",
    "trailers", "error_status", "large_messages", "cancellation", "deadline",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--direct", required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--only", action="append", help="run only these checks")
    args = parser.parse_args()

    checks = Checks(args.target, args.direct, args.server)
    failed = []
    for name in args.only or CHECKS:
        try:
            getattr(checks, name)()
            print("ok   %s" % name)
        except Mismatch as err:
            failed.append(name)
            print("FAIL %s: %s" % (name, err))
        except grpc.RpcError as err:
            failed.append(name)
            print("FAIL %s: unexpected RPC error %s: %r" % (name, err.code(), err.details()))
        except Exception:  # noqa: BLE001 - any crash is a failed check, reported in full
            failed.append(name)
            print("FAIL %s: %s" % (name, traceback.format_exc()))
    if failed:
        print("%d of %d checks failed: %s" % (len(failed), len(args.only or CHECKS), ", ".join(failed)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
