"""The job queue on Redis: the connection (one factory; embedded Redis), the stores (results, dedup locks,
late records, delivery claims and marks, text embeddings), RQ jobs and the worker.

Owns: every `car:` key but the review's (store), `JobQueue` (jobqueue), `run_job`/`WorkerContext` (jobs),
`JobWatch` (wait), `CarWorker` (worker), `connect`/`redis_client` (connection).
May import: engine, labelstudio, pipeline, settings. Never review or service.
"""
