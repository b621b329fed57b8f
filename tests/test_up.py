"""`modelgw up`: one command serves the demo model to callers with a token from its
development issuer; a second start finds its registry, and the tokens minted before."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from modelgw.net import free_port

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent


def start_up(data_dir: Path, http_port: int, grpc_port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "modelgw", "up", "--data-dir", str(data_dir),
         "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
    )


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise AssertionError(f"modelgw up exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no '{text}' after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def mint_token(data_dir: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "modelgw", "token", "--data-dir", str(data_dir), *args],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_up_serves_the_demo_model_and_keeps_its_registry(tmp_path: Path) -> None:
    data_dir = tmp_path / "home"
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path / "up.log"
    process = start_up(data_dir, http_port, grpc_port, log)
    try:
        wait_for_line(log, "modelgw is up", process)
        printed = log.read_text()
        assert "modelgw token --sub" in printed and 'Authorization: Bearer $TOKEN' in printed
        token = mint_token(data_dir, "--sub", "tester", "--scope", "modelgw:admin")
        body = json.dumps(
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": [0.1, 0.2, 0.3, 0.4, 1, 2, 3, 4]}]}
        ).encode()
        url = f"http://127.0.0.1:{http_port}/v2/models/demo/infer"
        with pytest.raises(urllib.error.HTTPError) as refused:  # no token, no prediction
            urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}), timeout=30)
        assert refused.value.code == 401
        request = urllib.request.Request(
            url, body, {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            result = json.loads(response.read())
        probabilities = np.array(result["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)

        # the same model, run here from the file `up` made, gives the same answer
        model = torch.export.load(str(data_dir / "models" / "demo" / "1" / "model.pt2")).module()
        expected = model(torch.tensor([[0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]])).detach().numpy()
        np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        auth = {"authorization": f"Bearer {token}"}
        assert client.is_model_ready("demo", headers=auth)
        x = grpcclient.InferInput("input", [1, 4], "FP32")
        x.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32))
        result = client.infer("demo", [x], headers=auth)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected[1:], rtol=1e-5, atol=1e-6)

        # the demo LLM answers the unmodified openai SDK with the same token
        import openai

        llm = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=token)
        chat = llm.chat.completions.create(
            model="tiny-llm", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
        )
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert 0 < chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 0

        # a model a user applies must survive a restart of `up`
        manifest = tmp_path / "extra.yaml"
        manifest.write_text(
            "kind: Model\nspec:\n  name: extra\n  versions:\n"
            f"  - {{version: '1', uri: 'file://{data_dir}/models/demo/1/model.pt2', format: pt2, runtime: pytorch}}\n"
        )
        applied = subprocess.run(
            [sys.executable, "-m", "modelgw", "apply", "-f", str(manifest), "--server", f"127.0.0.1:{grpc_port}",
             "--token", token],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )
        assert applied.returncode == 0, applied.stderr
        runtime_pids = [
            pid for pid in children_of(process.pid)
            if b"runtime\x00serve" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(runtime_pids) == 2, "up should have started one pytorch and one llm replica"
    finally:
        code = stop(process)
    assert code == 0, log.read_text()[-3000:]
    for pid in runtime_pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), (
            f"process {pid} outlived modelgw up"
        )

    # second start with the same data dir: the registry (etcd data) is found again
    log2 = tmp_path / "up2.log"
    process = start_up(data_dir, http_port, grpc_port, log2)
    try:
        wait_for_line(log2, "modelgw is up", process)
        got = subprocess.run(
            [sys.executable, "-m", "modelgw", "get", "models", "-o", "json", "--server", f"127.0.0.1:{grpc_port}"],
            capture_output=True, text=True, cwd=REPO, timeout=60,
            env={**os.environ, "MODELGW_TOKEN": token},  # minted before the restart: still valid
        )
        assert got.returncode == 0, got.stderr
        listed = json.loads(got.stdout)  # kubectl-style {"kind": "List", "items": [...]}
        assert {"demo", "extra"} <= {item["spec"]["name"] for item in listed["items"]}
        assert "reusing" not in log2.read_text()  # etcd was stopped by the first Ctrl-C and restarted
    finally:
        assert stop(process) == 0


# -- one `up` per data dir; etcd dies with it; failures are one line ------------------------


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """Where `up` records its data dir for `modelgw token`: this test's own."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run_dir)}
    env.pop("MODELGW_HOME", None)
    return env


def start_bare_up(data_dir: Path, log: Path, env: dict[str, str], http_port: int = 0, grpc_port: int = 0) -> subprocess.Popen:
    """`modelgw up --no-demo` (no torch, no models): etcd, issuer, reconciler, gateway."""
    return subprocess.Popen(
        [sys.executable, "-m", "modelgw", "up", "--no-demo", "--data-dir", str(data_dir),
         "--http-port", str(http_port or free_port()), "--grpc-port", str(grpc_port or free_port())],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True, env=env,
    )


def run_up(data_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelgw", "up", "--no-demo", "--data-dir", str(data_dir), *args],
        capture_output=True, text=True, cwd=REPO, timeout=120, env=env,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stdout + result.stderr
    return lines[0]


def pid_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "zombie" in status.read_text():
            return True
        time.sleep(0.1)
    return False


def test_one_up_per_data_dir_and_etcd_dies_with_it(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    data_dir = tmp_path / "home"
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path / "up.log"
    process = start_bare_up(data_dir, log, env, http_port, grpc_port)
    try:
        wait_for_line(log, "modelgw is up", process)
        # --no-demo registered no demo models: the banner offers no calls to them
        banner = log.read_text()
        assert "/v2/models/demo" not in banner and "demo LLM" not in banner and "tritonclient" not in banner, banner
        assert "modelgw apply -f my-model.yaml" in banner, banner
        state = json.loads((data_dir / "up.json").read_text())
        etcd_pid, etcd = state["etcd_pid"], state["etcd"]

        # the banner's etcdctl line reaches the registry
        assert f"etcdctl --endpoints {etcd} get --prefix /modelgw/v1/" in log.read_text()
        listed = subprocess.run(["etcdctl", "--endpoints", etcd, "get", "--prefix", "/modelgw/v1/", "--keys-only"],
                                capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0 and "/modelgw/v1/election/reconciler" in listed.stdout, listed

        # `modelgw token` without --data-dir mints from the issuer of the `up` that runs
        minted = subprocess.run([sys.executable, "-m", "modelgw", "token", "--sub", "t"],
                                capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
        assert minted.returncode == 0 and minted.stdout.count(".") == 2, minted.stderr
        payload = minted.stdout.strip().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert claims["iss"] == json.loads((data_dir / "issuer" / "issuer.json").read_text())["issuer"]

        # a second `up` on this data dir: who runs there, exit 1, nothing started
        line = one_line_error(run_up(data_dir, env))
        assert "already running" in line and str(process.pid) in line and str(grpc_port) in line, line
        assert process.poll() is None

        # SIGKILL: nothing can clean up, yet etcd goes with it (as the replicas do)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        assert pid_gone(etcd_pid), f"etcd (pid {etcd_pid}) outlived a SIGKILLed modelgw up"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)

    # the next `up` on the data dir starts (its own etcd, the lock free again)
    log2 = tmp_path / "up2.log"
    process = start_bare_up(data_dir, log2, env)
    try:
        wait_for_line(log2, "modelgw is up", process)
    finally:
        assert stop(process) == 0, log2.read_text()[-3000:]


def test_a_taken_port_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data_dir = tmp_path / "home"
        line = one_line_error(run_up(data_dir, env, "--grpc-port", str(port), "--http-port", str(free_port())))
        assert f"127.0.0.1:{port}" in line and "in use" in line, line
        assert not (data_dir / "etcd").exists() and not (data_dir / "logs").exists()  # nothing was started


def test_token_that_cannot_be_minted_prints_nothing_on_stdout(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    result = subprocess.run([sys.executable, "-m", "modelgw", "token", "--sub", "t", "--data-dir", str(tmp_path / "none")],
                            capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
    assert result.returncode != 0 and result.stdout == "" and "modelgw up" in result.stderr
