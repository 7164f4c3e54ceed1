"""Redis and RQ infrastructure: the connection (one factory; embedded Redis), one owner class per Redis key
family, the job queue, late deliveries and waiting on jobs.

Owns: the key families (keys), the result cache and job locks (results), the delivery ledger (ledger),
worker counters (stats), the text-embedding cache (textcache), per-project parameters and creation stamps
(projects), those owners on one client (state), `JobQueue`/`JobName` (jobqueue), every use of RQ internals
(rqcompat), `Deliverer` (delivery), `JobWatch` (wait), `connect`/`redis_client` (connection).
May import: engine, labelstudio, pipeline, settings. Never review, service or worker.
"""
