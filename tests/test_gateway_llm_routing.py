"""Load-aware replica choice for LLM models (gateway/routing.py `llm_load`, the proxy's
per-request stream counts): the choice on given figures, in process; and end to end, two
real LLM runtime replicas registered in a real etcd behind a real `modelgw gateway`, one
of them saturated by traffic that does not pass this gateway (as another gateway replica's
would): new OpenAI streams and gRPC streams go to the other, counted by the gateway's
`modelgw_llm_replica_picks_total`, never timed. Also: every metric the Grafana dashboard
(deploy/grafana/modelgw-gateway.json) queries is one that gateway's /metrics has."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import openai
import pytest
import tritonclient.grpc as triton
from conftest import REPO, modelgw_command
from gateway_helpers import (
    Fleet,
    GatewayProcess,
    RuntimeReplica,
    endpoints,
    metric_value,
    model_spec,
    runtime_spec,
    wait_model_ready,
    wait_until,
)

from modelgw.gateway.proxy import Proxy
from modelgw.gateway.routing import RoutingTable
from modelgw.gateway.upstream import UpstreamPool
from modelgw.oip.protocol import FINAL_RESPONSE
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import registry_pb2 as rpb

# -- the choice, on given figures --------------------------------------------------------


def llm_table(kind: str = "llm", replicas: int = 2) -> RoutingTable:
    spec = rpb.ModelSpec(name="m")
    spec.versions.add(version="1", uri="file:///x", runtime="rt")
    eps = {}
    for i in range(replicas):
        ep = rpb.Endpoint(runtime="rt", instance=f"r{i}", address=f"127.0.0.1:{9000 + i}", ready=True)
        ep.models.add(name="m", version="1", state=rpb.LoadedModel.READY)
        eps[f"rt/r{i}"] = ep
    table = RoutingTable()
    table.update([spec], eps, runtimes={"rt": rpb.RuntimeSpec(name="rt", kind=kind)})
    return table


def report(table: RoutingTable, key: str, **figures: float) -> None:
    ep = rpb.Endpoint(runtime="rt", instance=key.split("/")[1], address=table.replicas[key].address, ready=True)
    ep.load.CopyFrom(rpb.LoadFigures(**figures))
    table.report_loads([(key, ep)])


def picks(table: RoutingTable, n: int = 200) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _ in range(n):
        key = table.pick("m")[1].key
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_the_least_loaded_replica_wins_by_its_reported_figures() -> None:
    table = llm_table()
    report(table, "rt/r0", running=6, queue_depth=0, kv_cache_usage=0.5)
    report(table, "rt/r1", running=2, kv_cache_usage=0.2)
    assert picks(table) == {"rt/r1": 200}  # outstanding counts are equal (0): figures decide


def test_a_saturated_replica_gets_no_new_work_while_another_is_not() -> None:
    table = llm_table()
    # r0 has fewer sequences but a full KV cache; r1 more, with room
    report(table, "rt/r0", running=1, kv_cache_usage=0.97)
    report(table, "rt/r1", running=5, kv_cache_usage=0.6)
    assert picks(table) == {"rt/r1": 200}
    report(table, "rt/r0", running=1, queue_depth=1, kv_cache_usage=0.2)  # requests waiting
    assert picks(table) == {"rt/r1": 200}


def test_requests_sent_since_the_figures_count_and_equal_replicas_share() -> None:
    table = llm_table()
    report(table, "rt/r0", running=0)
    report(table, "rt/r1", running=0)
    assert set(picks(table)) == {"rt/r0", "rt/r1"}  # ties: random among the best
    table.replicas["rt/r0"].outstanding = 3  # sent by this gateway since the last figures
    assert picks(table) == {"rt/r1": 200}


def test_stale_busy_figures_fall_back_to_counts() -> None:
    table = llm_table()
    report(table, "rt/r0", running=8, kv_cache_usage=0.5)
    report(table, "rt/r1", running=0)
    table.replicas["rt/r1"].outstanding = 2
    assert picks(table) == {"rt/r1": 200}
    table.replicas["rt/r0"].load_seen = time.monotonic() - 10  # its record stopped moving
    assert picks(table) == {"rt/r0": 200}  # judged by counts: 0 outstanding against 2


def test_other_models_keep_power_of_two_choices_on_counts() -> None:
    table = llm_table(kind="onnx")
    report(table, "rt/r0", running=6, queue_depth=5)  # ignored: not an LLM
    assert set(picks(table)) == {"rt/r0", "rt/r1"}


async def test_an_llm_stream_counts_each_unanswered_request_on_its_replica() -> None:
    table = llm_table(replicas=1)
    proxy = Proxy(table, UpstreamPool())
    replica = table.replicas["rt/r0"]
    admission = proxy._admit("m", "", "grpc-stream")  # what proxy.stream() admits and picks
    admission.pick()
    assert replica.outstanding == 1
    for request_id in ("a", "b", "c"):
        admission.request_sent(request_id)
    assert replica.outstanding == 3

    def response(request_id: str, final: bool, tokens: int = 1) -> bytes:
        message = pb.ModelStreamInferResponse()
        message.infer_response.id = request_id
        message.infer_response.outputs.add(name="token_ids", datatype="INT64", shape=[tokens])
        message.infer_response.parameters[FINAL_RESPONSE].bool_param = final
        if final:
            message.infer_response.parameters["prompt_tokens"].int64_param = 3
            message.infer_response.parameters["completion_tokens"].int64_param = 5
        return message.SerializeToString()

    admission.response_received(response("a", False))
    admission.response_received(response("a", True))
    assert replica.outstanding == 2
    admission.response_received(response("b", True))
    admission.response_received(response("c", True))
    assert replica.outstanding == 1  # the open stream itself
    admission.release()
    assert replica.outstanding == 0
    await proxy.pool.close()


# -- end to end ----------------------------------------------------------------------------

RUNTIME = "llm"
MODEL = "tiny"
FORMAT = "hf-llama"
BUSY_SEQS = 2
STREAMS = 8


@dataclass
class Stack:
    fleet: Fleet
    gateway: GatewayProcess
    busy: RuntimeReplica
    idle: RuntimeReplica

    def picks(self, replica: RuntimeReplica) -> float:
        return metric_value(self.gateway.metrics(), "modelgw_llm_replica_picks_total", instance=replica.instance)

    def record(self, replica: RuntimeReplica) -> rpb.Endpoint:
        (ep,) = [e for e in endpoints(self.fleet.etcd, self.fleet.prefix) if e.instance == replica.instance]
        return ep


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, etcd_server) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("llm-routing")
    checkpoint = root / "tiny"
    made = subprocess.run(
        modelgw_command("llm", "make-checkpoint", str(checkpoint), "--layers", "2", "--hidden", "64",
                        "--max-position", "8192", "--seed", "5"),
        capture_output=True, text=True, timeout=120,
    )
    assert made.returncode == 0, made.stderr
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        fleet.apply(runtime_spec(RUNTIME, "llm", [FORMAT]), model_spec(MODEL, RUNTIME, FORMAT, {"1": str(checkpoint)}))
        options = ("--option", "threads=1", "--option", f"max_num_seqs={BUSY_SEQS}")
        busy, idle = fleet.replica(RUNTIME, "llm", *options), fleet.replica(RUNTIME, "llm", *options)
        gateway = fleet.gateway()
        wait_model_ready(gateway.grpc_url, MODEL, timeout=180, what=f"(logs in {root})")
        wait_until(lambda: sum(e.ready for e in endpoints(fleet.etcd, fleet.prefix)) == 2, 180,
                   f"both replicas ready (logs in {root})")
        yield Stack(fleet, gateway, busy, idle)
    finally:
        fleet.close()


def _prompt(text: str) -> triton.InferInput:
    prompt = triton.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return prompt


def test_new_streams_avoid_a_replica_saturated_by_other_traffic(stack: Stack) -> None:
    # saturate one replica directly, as traffic through another gateway would: every
    # sequence slot taken, more waiting; long generations that outlive the test
    direct = triton.InferenceServerClient(stack.record(stack.busy).address)
    errors: queue.Queue = queue.Queue()
    direct.start_stream(callback=lambda result, error: error is not None and errors.put(error))
    try:
        for i in range(BUSY_SEQS + 2):
            direct.async_stream_infer(MODEL, [_prompt("Hello world")], request_id=f"bg{i}",
                                      parameters={"max_tokens": 6000, "temperature": 0, "ignore_eos": True})
        wait_until(lambda: stack.record(stack.busy).load.queue_depth >= 1, 60, "the busy replica never queued")
        time.sleep(0.5)  # its record reached the gateway's watch (milliseconds; no timing asserted)
        before_busy, before_idle = stack.picks(stack.busy), stack.picks(stack.idle)

        client = openai.OpenAI(base_url=f"{stack.gateway.base}/v1", api_key="unused", max_retries=0, timeout=120)
        for _ in range(STREAMS):  # one after the other: this gateway's own counts are equal (0) each time
            chunks = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
            assert sum(1 for _ in chunks) >= 1

        responses: queue.Queue = queue.Queue()
        through = triton.InferenceServerClient(stack.gateway.grpc_url)
        through.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            for i in range(STREAMS):
                through.async_stream_infer(MODEL, [_prompt("Hi")], request_id=f"g{i}",
                                           parameters={"max_tokens": 4, "temperature": 0, "ignore_eos": True})
                while True:  # one generation at a time, to its final response
                    result, error = responses.get(timeout=60)
                    assert error is None, error
                    if result.get_response().parameters[FINAL_RESPONSE].bool_param:
                        break
        finally:
            through.stop_stream()
            through.close()
        assert errors.empty(), errors.get()
        # the gRPC client's stream is one upstream stream: one pick; the OpenAI streams one each
        assert stack.picks(stack.busy) - before_busy == 0
        assert stack.picks(stack.idle) - before_idle == STREAMS + 1
        metrics = stack.gateway.metrics()
        assert metric_value(metrics, "modelgw_llm_time_to_first_token_seconds_count", model=MODEL) >= 2 * STREAMS
        assert metric_value(metrics, "modelgw_llm_inter_token_latency_seconds_count", model=MODEL) >= 2 * STREAMS
        assert metric_value(metrics, "modelgw_llm_completion_tokens_total", model=MODEL) >= 2 * STREAMS * 4
    finally:
        direct.stop_stream(cancel_requests=True)
        direct.close()


# -- the Grafana dashboard ---------------------------------------------------------------

DASHBOARD = REPO / "deploy" / "grafana" / "modelgw-gateway.json"
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}


def exposed_names(text: str) -> set[str]:
    """The sample names a /metrics text has or would have (a labelled metric with no
    samples yet shows only its TYPE line)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if kind == "counter":  # named with or without _total, by prometheus_client version
                name = name.removesuffix("_total")
            names.update(name + suffix for suffix in _SUFFIXES.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_the_dashboard_queries_only_metrics_the_gateway_has(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(exprs) >= 10
    exposed = exposed_names(stack.gateway.metrics())
    queried = {name for expr in exprs for name in re.findall(r"\bmodelgw_[a-z_]+", expr)}
    assert {"modelgw_llm_time_to_first_token_seconds_bucket", "modelgw_llm_completion_tokens_total",
            "modelgw_tenant_limited_total"} <= queried
    assert queried - exposed == set(), f"the dashboard queries metrics the gateway does not have: {queried - exposed}"
