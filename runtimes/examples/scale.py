"""The smallest useful python-kind model. Serve it with:

    modelgw runtime serve --kind python --model scale=modelgw.runtimes.examples.scale:Scale \
        --port 8001 --option factor=3

`inputs`/`outputs` are what clients see in ModelMetadata (-1: any size). max_batch_size > 0
makes dim 0 the batch: concurrent requests are merged into one predict call.
"""

import numpy as np

from modelgw.runtimes.model import Model, TensorSpec


class Scale(Model):
    """y = x * factor, for a batch of FP32 vectors."""

    inputs = [TensorSpec("x", "FP32", [-1, -1])]
    outputs = [TensorSpec("y", "FP32", [-1, -1])]
    max_batch_size = 32

    def load(self) -> None:  # runs once, in a thread: read weights, open sessions here
        self.factor = np.float32(self.options.get("factor", 2))

    def predict(self, inputs, parameters):  # a batch in, a batch out (blocking is fine)
        return {"y": inputs["x"] * self.factor}
