"""A python-kind model for the auth tests, served as `tests.auth_models:WhoAmI` (the
runtime's working directory is the repository root)."""

from __future__ import annotations

import numpy as np

from modelgw.runtimes.model import REQUEST_METADATA, Model, TensorSpec

SUBJECT = "x-modelgw-subject"


class WhoAmI(Model):
    """Answers with every x-modelgw-subject value the runtime received for this request
    (comma-joined; empty when none): what the gateway forwarded, nothing else."""

    inputs = [TensorSpec("x", "FP32", [-1])]
    outputs = [TensorSpec("subjects", "BYTES", [1])]
    max_batch_size = 0  # one caller per predict call: the request's metadata is its own

    def predict(self, inputs, parameters):
        values = [v for k, v in REQUEST_METADATA.get() if k == SUBJECT and isinstance(v, str)]
        return {"subjects": np.array([",".join(values).encode()], dtype=object)}
