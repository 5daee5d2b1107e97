"""radserve benchmarks: a gRPC load generator, in-process baselines and the benchmark runs (see README.md here)."""
