"""The HTTP service: the Flask app and its routes, request parsing, the predictor, project identity and
per-project state, metrics, the HTTP server (waitress), `/status`, `prelabel`, and the embedded worker process.

Owns: `create_app` (app), the blueprint (routes), `parsing`, `Predictor`, `Projects`, `Metrics`, `Backend`
(one process's Redis clients, Redis state, queue and embedded worker), `EmbeddedWorkerProcess` (embedded),
`server` (`serve`), `status`, `prelabel`.
May import: engine, labelstudio, pipeline, queue, review, settings; never worker (the embedded worker is a
`car-backend worker` child process). The HTTP process never imports torch: only `prelabel --images` loads
the engine's models (imported inside the function that runs them).
"""
