"""KServe's Python ModelServer serving one TorchScript file: the baseline of
bench/runtime_throughput.py. Runs in KServe's own virtualenv (bench/.venv-kserve), never
imports modelgw.

It is a plain `kserve.Model` subclass, written the way KServe documents custom
predictors: `load` reads the model, a synchronous `predict` takes the v2 InferRequest,
runs the model and returns an InferResponse with raw (binary) output. The ModelServer is
left at its defaults apart from the ports (gRPC v2 on --grpc-port, REST on --http-port).
No batching; torch uses --torch-threads intra-op threads, like the modelgw side.

    python kserve_torchscript_server.py --model-file m.pt --model-name mlp \
        --grpc-port 8081 --http-port 8080 --torch-threads 1 --output-name output__0
"""

from __future__ import annotations

import argparse
import sys


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-file", required=True, help="TorchScript file (torch.jit.save)")
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--grpc-port", type=int, default=8081)
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--output-name", default="output__0")
    return parser.parse_args()


# Parsed before kserve is imported: kserve.model_server parses sys.argv at import time.
ARGS = parse_args()
sys.argv = sys.argv[:1]

import torch  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402


class TorchScriptModel(Model):
    def __init__(self, name: str, path: str, output_name: str) -> None:
        super().__init__(name)
        self.path = path
        self.output_name = output_name
        self.module: torch.jit.ScriptModule | None = None
        self.load()

    def load(self) -> bool:
        self.module = torch.jit.load(self.path, map_location="cpu").eval()
        self.ready = True
        return self.ready

    def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None
    ) -> InferResponse:
        inputs = [torch.from_numpy(tensor.as_numpy().copy()) for tensor in payload.inputs]
        with torch.inference_mode():
            result = self.module(*inputs).numpy()
        output = InferOutput(name=self.output_name, shape=list(result.shape), datatype="FP32")
        output.set_data_from_numpy(result, binary_data=True)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=[output],
            use_binary_outputs=True,
        )


def main() -> None:
    torch.set_num_threads(ARGS.torch_threads)
    model = TorchScriptModel(ARGS.model_name, ARGS.model_file, ARGS.output_name)
    ModelServer(http_port=ARGS.http_port, grpc_port=ARGS.grpc_port).start([model])


if __name__ == "__main__":
    main()
