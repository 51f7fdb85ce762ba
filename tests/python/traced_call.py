#!/usr/bin/env python3
"""One Echo.Unary call with a W3C trace context, from grpcio: Tern's tracing test's client.

Usage: traced_call.py --target ADDR --traceparent VALUE [--tracestate VALUE]
Exits non-zero, with the status, when the call fails.
"""

import argparse
import sys

import grpc

from tern.test.v1 import echo_pb2, echo_pb2_grpc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--traceparent", required=True)
    parser.add_argument("--tracestate")
    args = parser.parse_args()
    metadata = [("traceparent", args.traceparent)]
    if args.tracestate:
        metadata.append(("tracestate", args.tracestate))
    with grpc.insecure_channel(args.target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        try:
            reply = stub.Unary(echo_pb2.EchoRequest(message="traced"), metadata=metadata, timeout=5)
        except grpc.RpcError as e:
            print(f"call failed: {e.code()} {e.details()}", file=sys.stderr)
            return 1
    print(f"ok {reply.server}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
