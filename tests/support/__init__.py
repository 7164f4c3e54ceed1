"""Shared test helpers: everything the tests use that is not a fixture (fixtures live in the conftest files).

Modules that re-export car_backend.testing (the harness the benchmarks share, one copy of each piece):

- `redis`: free_port, port_open, start_redis_server, claim_redis_db;
- `settings`: TINY_CLIP_CONFIG, TINY_MODEL, tiny_settings, settings_env;
- `processes`: WorkerProcess, start_worker, wait_for_worker;
- `fake_label_studio`: FakeLabelStudio (API + images + exact routes), Reply, Seen, PAT, image_bytes, query.

Test-only helpers:

- `label_configs`: the shipped label configs (label_config("brush"), read_config("brush.xml"));
- `service`: predict() through a Flask test client, DELIVERY_TIMEOUT_S;
- `review`: annotators with a known taste for the active-learning tests;
- `engine`: the tiny CLIP config and car_backend.engine.synthetic's random CLIPs and scenes;
- `colour_model`: a hand-built CLIP that sees hue, and scenes of coloured shapes;
- `label_studio`: a real Label Studio for the end-to-end tests (install, start, log in, client).
"""
