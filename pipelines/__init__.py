"""Models as jobs (a dataset in, predictions out) and on streams (Kafka or NATS JetStream
consumers that never end by themselves): `modelgw job run`, `modelgw stream run`."""
