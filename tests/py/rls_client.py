#!/usr/bin/env python3
"""Independent Envoy RLS v3 client for ratelimitd's wire-compatibility tests.

Uses grpcio and Envoy's own generated protos (the PyPI package ``xds-protos``), so nothing
here shares code or proto definitions with ratelimitd.

Usage:
  rls_client.py TARGET                    read {"request": <RateLimitRequest JSON>} on stdin,
                                          call ShouldRateLimit on TARGET (host:port or
                                          unix:PATH, insecure, 5 s timeout) and print one JSON
                                          line: {"ok": <response>} or
                                          {"error": {"code": "...", "details": "..."}}
    --repeat N                            make the call N times on one channel (so later calls'
                                          headers use HPACK's dynamic table), one line each
    --authority A                         send A as :authority (grpc.default_authority)
  rls_client.py --raw-request-hex         read the same stdin document and print the serialized
                                          request as hex instead of calling anything
  rls_client.py --decode-response-hex HEX parse HEX as a serialized RateLimitResponse and print
                                          it as JSON

Responses are printed with MessageToDict(preserving_proto_field_name=True,
always_print_fields_with_no_presence=True), so zero-valued scalars (e.g. limit_remaining: 0)
appear. Unexpected failures exit with status 2 and a message on stderr.
"""

import argparse
import binascii
import json
import sys

try:
    import grpc
    from google.protobuf import json_format
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
except ImportError as e:  # pragma: no cover - environment problem
    print(
        f"rls_client.py: cannot import grpcio/xds-protos ({e}); "
        "create the venv from tests/py/requirements.txt",
        file=sys.stderr,
    )
    sys.exit(2)

TIMEOUT_SECS = 5.0


def fail(msg):
    print(f"rls_client.py: {msg}", file=sys.stderr)
    sys.exit(2)


def response_to_dict(resp):
    return json_format.MessageToDict(
        resp,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def read_request():
    text = sys.stdin.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"stdin is not JSON: {e}")
    if not isinstance(doc, dict) or "request" not in doc:
        fail('stdin must be a JSON object {"request": <RateLimitRequest JSON>}')
    req = rls_pb2.RateLimitRequest()
    try:
        json_format.ParseDict(doc["request"], req)
    except json_format.ParseError as e:
        fail(f"request is not a valid RateLimitRequest: {e}")
    return req


def emit(obj):
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def call_once(stub, req):
    try:
        resp = stub.ShouldRateLimit(req, timeout=TIMEOUT_SECS)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        emit(
            {
                "error": {
                    "code": code.name if code is not None else "UNKNOWN",
                    "details": details or "",
                }
            }
        )
        return
    emit({"ok": response_to_dict(resp)})


def call(target, req, repeat=1, authority=None):
    options = [("grpc.default_authority", authority)] if authority else []
    with grpc.insecure_channel(target, options=options) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        for _ in range(repeat):
            call_once(stub, req)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--raw-request-hex",
        action="store_true",
        help="print the serialized stdin request as hex instead of calling",
    )
    mode.add_argument(
        "--decode-response-hex",
        metavar="HEX",
        help="decode a serialized RateLimitResponse and print it as JSON",
    )
    p.add_argument("target", nargs="?", help="host:port or unix:PATH of the RLS gRPC server")
    p.add_argument(
        "--repeat", type=int, default=1, help="calls on one channel, one output line each"
    )
    p.add_argument("--authority", help="the :authority to send (grpc.default_authority)")
    args = p.parse_args()

    if args.decode_response_hex is not None:
        try:
            raw = binascii.unhexlify(args.decode_response_hex.strip())
        except (binascii.Error, ValueError) as e:
            fail(f"--decode-response-hex: not hex: {e}")
        resp = rls_pb2.RateLimitResponse()
        try:
            resp.ParseFromString(raw)
        except Exception as e:  # DecodeError
            fail(f"--decode-response-hex: not a RateLimitResponse: {e}")
        emit(response_to_dict(resp))
        return

    req = read_request()
    if args.raw_request_hex:
        sys.stdout.write(req.SerializeToString().hex() + "\n")
        return

    if not args.target:
        fail("TARGET (host:port) is required unless --raw-request-hex or --decode-response-hex")
    call(args.target, req, args.repeat, args.authority)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception as e:  # anything unexpected: non-zero with a clear message
        fail(f"unexpected failure: {type(e).__name__}: {e}")
