"""The HTTP service: the Flask app and its routes, request parsing, the predictor, per-project state,
metrics, the gunicorn server, and `prelabel`.

Owns: `create_app` (app), the blueprint (routes), `parsing`, `Predictor`, `Projects`, `Metrics`, `Backend`
(one process's Redis clients, stores, queue and embedded worker), `gunicorn` (`serve`), `prelabel`.
May import: engine, labelstudio, pipeline, queue, review, settings. The HTTP process never imports torch:
only `prelabel --images` loads the engine's models (imported inside the function that runs them).
"""
