"""A harness for tests and benchmarks, never imported by the product.

Pieces that both the test suite (through tests/support) and the benchmarks use, so each has one copy:

- `redis`: a throwaway redis-server, a claimed database of a shared Redis, free loopback ports;
- `settings`: the tiny random CLIP's config, `tiny_settings()`, and the environment that reproduces a
  Settings in a child process;
- `processes`: `car-backend worker` processes (start, wait until registered, stop);
- `fake_label_studio`: a stand-in for Label Studio's API, images and media endpoints on 127.0.0.1;
- `faults`: delivery fault scenarios (tests/service/test_faults.py, benchmarks/faults.py);
- `scenes`: generated scenes with known masks (mask-head tests, benchmarks/fit.py);
- `precision`: the engine's parity cases and its bf16-against-fp32 agreement (tests/engine/test_precision.py,
  benchmarks/precision.py);
- `attacker`: an HTTP server on another loopback address that records connections and `Authorization`.

Nothing in car_backend outside this package imports it (tests/test_layers.py checks).
"""
