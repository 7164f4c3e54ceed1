"""A Redis for tests: see car_backend.testing.redis (shared with the benchmarks)."""

from car_backend.testing.redis import (
    claim_redis_db,
    free_port,
    port_open,
    redis_for_tests,
    redis_server_binary,
    start_redis_server,
)

__all__ = ["claim_redis_db", "free_port", "port_open", "redis_for_tests", "redis_server_binary", "start_redis_server"]
