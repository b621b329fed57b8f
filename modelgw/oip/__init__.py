"""The Open Inference Protocol (KServe v2 / Triton) as modelgw speaks it: the ground floor
that the gateway and the runtimes both import, and that imports neither.

    codec     tensors <-> ModelInfer messages (typed and raw contents), parameters
    protocol  constants: the message-size limit, the shape-dims limit, Triton's stream
              parameter names, the extensions list, modelgw's header names
"""
