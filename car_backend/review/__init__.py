"""Active learning, as a library the worker's jobs call: annotation events (webhook), corrections and their
agreement with what was delivered (corrections, agreement), threshold calibration (calibration), mask-head
training (fit), when those run (triggers), the one store of `car:review:*` keys (store) and the report.

Jobs get what they work with as a `runtime.ReviewRuntime`, built by the worker (car_backend.worker).
May import: engine, labelstudio, pipeline, queue, settings. Never service or worker.
"""
