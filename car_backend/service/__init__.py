"""The HTTP service: the Flask app and its routes, request parsing, the predictor, per-project state,
metrics, the gunicorn server, and `prelabel`.

Owns: `create_app` (app), the blueprint (routes), `parsing`, `Predictor`, `Projects`, `Metrics`, `Backend`
(one process's Redis clients, stores, queue and embedded worker), `gunicorn` (`serve`), `prelabel`.
May import: engine (errors only: the server never imports torch), labelstudio, pipeline, queue, review,
settings.
"""
