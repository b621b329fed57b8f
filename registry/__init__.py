"""The registry: models, runtimes, jobs, streams, endpoints and status in etcd.

    keys        the key layout under a prefix (default /modelgw/v1/) and KINDS, the one
                table of record kinds
    codec       records <-> the JSON stored in etcd (proto3 JSON mapping)
    validation  field-specific checks of records
    errors      the registry's errors (each maps to one gRPC status code)
    etcd        a thin asyncio layer over aetcd
    store       RegistryStore: the client, composed of records (models, runtimes,
                status, gateway defaults), workloads (jobs, streams and their status),
                endpoints (and their leases), election, and its watches
    writes      the one conditional write: read, check, transaction, bounded retry
    leases      Lease: a lease kept alive in the background
    follow      follow a key range through compactions and outages
    view        RegistryView: the in-memory watch cache the gateway routes on
    service     RegistryService (gRPC) over a store; client: its asyncio client
    files, cli  `modelgw apply|get|delete` and their file format
    etcd_server LocalEtcd: a real etcd process for `modelgw up` and the tests
"""
