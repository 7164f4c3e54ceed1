"""The worker process: its composition root and the jobs RQ runs in it.

Owns: `WorkerContext` (context: the process's Redis state, queue, review store, Label Studio client, media
fetcher, deliverer, engine and mask heads, built once), the RQ entry points named by
`queue.jobqueue.JobName` (tasks), the worker process (`car-backend worker`: process, with its interactive
lane, named by lanes) and its health check (health).
May import: every package below the service's floor. Never service (the embedded worker process is the
service's: it starts `car-backend worker` as a child).
"""
