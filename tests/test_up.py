"""`modelgw up`: one command serves the demo model to callers with a token from its
development issuer; a second start finds its registry, and the tokens minted before."""

from __future__ import annotations

import json
import os
import signal
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
    )  # fmt: skip


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
    )  # fmt: skip
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
        model = torch.jit.load(str(data_dir / "models" / "demo" / "1" / "model.pt"))
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
            f"  - {{version: '1', uri: 'file://{data_dir}/models/demo/1/model.pt', format: torchscript, runtime: pytorch}}\n"
        )
        applied = subprocess.run(
            [sys.executable, "-m", "modelgw", "apply", "-f", str(manifest), "--server", f"127.0.0.1:{grpc_port}",
             "--token", token],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )  # fmt: skip
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
        )  # fmt: skip
        assert got.returncode == 0, got.stderr
        listed = json.loads(got.stdout)  # kubectl-style {"kind": "List", "items": [...]}
        assert {"demo", "extra"} <= {item["spec"]["name"] for item in listed["items"]}
        assert "reusing" not in log2.read_text()  # etcd was stopped by the first Ctrl-C and restarted
    finally:
        assert stop(process) == 0
