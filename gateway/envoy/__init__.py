"""Envoy as the gateway's gRPC data plane (`modelgw gateway --data-plane envoy`).

- config:     the routing table and the auth config compiled into Envoy v3 resources
- supervisor: the Envoy process, its files, and the loop that rewrites them on registry changes
"""
