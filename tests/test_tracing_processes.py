"""Traces and JSON logs across real processes: `viper serve` and `viper web` configured by the standard OTEL_*
variables, exporting over OTLP to a receiver run by the test (the collector's own protocol, in memory), and
their `--log-format json` lines."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys

import pytest

from viper_client import NotFound, ViperClient
from viper_server.testing import ServerProcess
from viper_server.testing.otlp import OtlpReceiver
from viper_web.testing import GatewayProcess

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
GET_PROFILE = "/viper.v1.ProfileService/GetProfile"


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def traced_server(receiver, tiny_models_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "profiles.db"
    with ServerProcess(db, tiny_models_dir, "--log-format", "json", env=receiver.env("test-server")) as server:
        yield server


def test_the_page_the_gateway_and_the_server_share_one_trace(receiver, traced_server):
    with GatewayProcess(traced_server.target, extra_args=("--log-format", "json"),
                        env=receiver.env("test-gateway")) as gateway:
        connection = http.client.HTTPConnection(gateway.url.split("//")[1], timeout=60)
        connection.request("POST", GET_PROFILE, body=json.dumps({"userId": "nobody"}),
                           headers={"Content-Type": "application/json",
                                    "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"})
        assert connection.getresponse().status == 404
        connection.close()
        # The gateway's JSON line of the call: its fields, and the trace it belongs to.
        entry = json.loads(gateway.wait_for_log(r'"logger": "viper_web.rpc"'))
        assert entry["method"] == GET_PROFILE and entry["status"] == "NOT_FOUND" and entry["user"] == "nobody"
        assert entry["trace_id"] == TRACE_ID and isinstance(entry["duration_ms"], float)
    ours = lambda service, span: span.trace_id.hex() == TRACE_ID  # noqa: E731
    in_gateway = receiver.wait_for(lambda service, span: ours(service, span) and service == "test-gateway")
    in_server = receiver.wait_for(lambda service, span: ours(service, span) and service == "test-server")
    [(_, gateway_span)] = in_gateway
    [(_, server_span)] = [(s, span) for s, span in in_server if span.name.endswith("GetProfile")]
    assert gateway_span.parent_span_id.hex() == CALLER_SPAN  # the page's span -> the gateway's
    assert server_span.parent_span_id == gateway_span.span_id  # the gateway's -> the server's
    status = {a.key: a.value.string_value for a in server_span.attributes}["rpc.grpc.status_code"]
    assert status == "NOT_FOUND"


def test_without_a_traceparent_the_server_starts_a_trace_of_its_own(receiver, traced_server):
    with ViperClient(traced_server.target) as client, pytest.raises(NotFound):
        client.get_profile("a-new-trace")
    [(_, span)] = receiver.wait_for(
        lambda service, span: service == "test-server" and span.name.endswith("GetProfile")
        and any(a.value.string_value == "default/a-new-trace" for a in span.attributes))
    assert not span.parent_span_id and span.trace_id.hex() not in ("", "0" * 32, TRACE_ID)


def test_json_log_lines_parse_and_carry_the_request_and_trace_ids(receiver, traced_server):
    with ViperClient(traced_server.target) as client, pytest.raises(NotFound):
        client.get_profile("logged-user", timeout=30)
    line = traced_server.wait_for_log(r'"request_id".*"user": "logged-user"|"user": "logged-user".*"request_id"')
    entry = json.loads(line)
    assert entry["level"] == "info" and entry["logger"] == "viper_server.rpc"
    assert entry["method"] == GET_PROFILE and entry["status"] == "NOT_FOUND"
    assert isinstance(entry["duration_ms"], float) and len(entry["request_id"]) == 16
    assert len(entry["trace_id"]) == 32 and len(entry["span_id"]) == 16
    assert entry["time"].endswith("Z")
    # Every line the server wrote parses: start-up, loading, calls.
    for logged in traced_server.logs:
        json.loads(logged)


def test_an_unknown_exporter_stops_start_up_with_one_line(tmp_path, tiny_models_dir):
    result = subprocess.run(
        [sys.executable, "-m", "viper_server", "serve", "--port", "0", "--db", str(tmp_path / "p.db"),
         "--models", "tiny", "--models-dir", str(tiny_models_dir)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OTEL_TRACES_EXPORTER": "zipkin"},
    )
    assert result.returncode == 2
    assert "OTEL_TRACES_EXPORTER=zipkin: expected one of none, console, otlp" in result.stderr


def test_the_sdk_passes_a_trace_only_when_the_caller_has_one_and_imports_no_opentelemetry_itself():
    # In a fresh interpreter: importing the SDK and making a channel's metadata loads no opentelemetry module.
    code = (
        "import sys\n"
        "from viper_client.channel import Connection\n"
        "connection = Connection(None, None, None, None, (('authorization', 'Bearer t'),))\n"
        "assert connection.metadata_for('u') == (('authorization', 'Bearer t'), ('x-viper-user', 'u'))\n"
        "print(sorted(name for name in sys.modules if name.startswith('opentelemetry')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

    from opentelemetry.sdk.trace import TracerProvider

    from viper_client.channel import Connection

    connection = Connection(None, None, None, None, ())
    with TracerProvider().get_tracer("caller").start_as_current_span("caller") as span:
        metadata = dict(connection.metadata_for("u"))
    context = span.get_span_context()
    assert metadata["traceparent"].startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
