"""A job's calls through a gateway with authentication on: the bearer token comes from the
call's token_file and is reread when the file changes (a rotated Kubernetes secret); a
token the model's policy refuses, or a token file that is not there, stops the call with
an error that says so. A real OIDC issuer on loopback, a real gateway and runtime."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from auth_helpers import AUDIENCE, AuthGateway, Issuer
from gateway_helpers import Fleet, model_spec, runtime_spec, wait_until
from job_helpers import job_spec, run_job

from modelgw.pipelines.caller import CallError, open_caller
from modelgw.protos import registry_pb2 as rpb

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")


class Setup:
    def __init__(self, gateway: AuthGateway, issuer: Issuer, key) -> None:
        self.gateway = gateway
        self.issuer = issuer
        self.key = key

    def write_token(self, path: Path, **claims) -> None:
        """As a secret volume updates: a new file renamed over the old one."""
        temp = path.with_name(path.name + ".new")
        temp.write_text(self.issuer.token(self.key, **claims) + "\n")
        os.replace(temp, path)


@pytest.fixture(scope="module")
def setup(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("jobs-auth")
    issuer = Issuer().start()
    key = issuer.new_key("RS256")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        spec = model_spec("subjects", "py", "python", {"1": "tests.job_helpers:Subjects"})
        spec.access.scopes.append("jobs:score")
        fleet.apply(runtime_spec("py", "python", ["python"]), spec)
        fleet.replica("py", "python")
        config = root / "auth.yaml"
        config.write_text(f"issuers:\n  - issuer: {issuer.url}\n    audiences: [{AUDIENCE}]\n")
        gateway = AuthGateway.in_fleet(fleet, "--auth-config", str(config))
        setup = Setup(gateway, issuer, key)
        token = root / "ready-token"
        setup.write_token(token, scope="jobs:score")

        async def ready() -> bool:
            try:
                caller = await open_caller(rpb.ModelCall(model="subjects", gateway=gateway.grpc_url, token_file=str(token)),
                                           retry_seconds=0)
            except CallError:
                return False
            await caller.aclose()
            return True

        import asyncio

        wait_until(lambda: asyncio.run(ready()), 90, f"model not ready (logs in {root})")
        yield setup
    finally:
        fleet.close()
        issuer.stop()


async def test_the_token_file_is_sent_and_reread_when_it_changes(setup: Setup, tmp_path: Path) -> None:
    token = tmp_path / "token"
    setup.write_token(token, sub="alice", scope="jobs:score")
    caller = await open_caller(rpb.ModelCall(model="subjects", gateway=setup.gateway.grpc_url, token_file=str(token)))
    try:
        results = await caller.infer_rows([{"x": 1.0}, {"x": 2.0}])
        assert [r.outputs["subject"].item() for r in results] == [b"alice", b"alice"]
        setup.write_token(token, sub="bobby", scope="jobs:score")  # rotated: same length, new file
        results = await caller.infer_rows([{"x": 1.0}])
        assert results[0].outputs["subject"].item() == b"bobby"
        setup.write_token(token, sub="carol", scope="other")
        with pytest.raises(CallError) as info:
            await caller.infer_rows([{"x": 1.0}])
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "subjects" in str(info.value)
    finally:
        await caller.aclose()


def test_a_job_whose_token_file_is_missing_fails_naming_it(setup: Setup, tmp_path: Path) -> None:
    table = tmp_path / "in.jsonl"
    table.write_text('{"x": 1.0}\n')
    spec = job_spec("no-token", table, tmp_path / "out", gateway=setup.gateway.grpc_url, model="subjects")
    spec.model.token_file = str(tmp_path / "absent-token")
    from job_helpers import write_job_file

    log = tmp_path / "job.log"
    assert run_job(log, "-f", str(write_job_file(tmp_path / "job.json", spec))) == 1
    assert "absent-token" in log.read_text()
