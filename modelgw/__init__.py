"""modelgw: a gRPC multi-runtime model gateway with an etcd-backed registry."""

__version__ = "0.1.0"
