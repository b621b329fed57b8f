"""KServe's Python ModelServer serving small numpy models, for the attach tests
(tests/test_runtime_attach.py). Runs in KServe's own virtualenv (tests/kserve_helpers.py
builds it) and never imports modelgw: it is the third-party server under test.

    python kserve_server.py --grpc-port 8081 --http-port 8080 --model double [--model other]

Each model is a plain `kserve.Model`, written the way KServe documents custom predictors:
y = x * 2 (FP32), plus `pid` (INT64, the serving process), so a test tells this server's
answers from modelgw's Echo (y = x + 1). The ModelServer is left at its defaults apart
from the ports.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", dest="models", action="append", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    return parser.parse_args()


# Parsed before kserve is imported: kserve.model_server parses sys.argv at import time.
ARGS = parse_args()
sys.argv = sys.argv[:1]

import numpy as np  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402


class Double(Model):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.load()

    def load(self) -> bool:
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        y = InferOutput(name="y", shape=list(x.shape), datatype="FP32")
        y.set_data_from_numpy((x * 2).astype(np.float32), binary_data=True)
        pid = InferOutput(name="pid", shape=[1], datatype="INT64")
        pid.set_data_from_numpy(np.array([os.getpid()], dtype=np.int64), binary_data=True)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[y, pid],
                             use_binary_outputs=True)


def main() -> None:
    ModelServer(http_port=ARGS.http_port, grpc_port=ARGS.grpc_port).start([Double(name) for name in ARGS.models])


if __name__ == "__main__":
    main()
