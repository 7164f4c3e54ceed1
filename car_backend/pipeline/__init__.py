"""The pure middle: job specs, planning a task into jobs, computing a job, versions.

Owns: `JobSpec`/`JobResult`/`Project` (spec), `plan_task` (planning), `compute` (compute), `model_version`
and the engine fingerprint (versions), and the JSON forms of its dataclasses (plain).
May import: engine, labelstudio, settings. Never Redis, RQ, Flask, or anything above it.
"""
