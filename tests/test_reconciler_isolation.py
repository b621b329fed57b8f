"""Replicas the local backend starts do not import from the caller's working directory:
`modelgw up` run from the parent of a checkout (a directory holding a folder `modelgw`)
must not shadow the installed package in every replica it starts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from reconciler_helpers import ready_endpoints, until

from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.local import LocalBackend
from modelgw.registry.store import RegistryStore


async def test_a_replica_comes_up_from_a_directory_holding_a_modelgw_folder(
    etcd_server, etcd_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caller = tmp_path / "parent-of-a-checkout"
    (caller / "modelgw").mkdir(parents=True)  # a namespace package `modelgw`, were the cwd on sys.path
    monkeypatch.chdir(caller)
    spec = rpb.RuntimeSpec(name="iso", kind="python", model_formats=["python"], replicas=1)
    backend = LocalBackend(etcd_server.endpoint, etcd_prefix, log_dir=tmp_path / "logs", lease_ttl=3, stop_grace=5)
    process = await backend.spawn(spec, "iso-0")
    log = backend.log_path("iso-0")

    async def up() -> bool:
        if process.returncode is not None:
            raise AssertionError(f"the replica exited with {process.returncode}:\n{log.read_text()}")
        async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
            return bool(await ready_endpoints(store, "iso"))

    try:
        await until(up, "the replica registered ready", logs=log.read_text)
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)
