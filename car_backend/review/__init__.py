"""Active learning: agreement of predictions with annotators' corrections, the threshold search, the review
store, the review and calibration jobs, and the report.

Owns: `car:review:*` keys (store), `compare`/`search` (agreement), `review_annotation`/`calibrate_project`
(jobs), `project_report` (report).
May import: engine, labelstudio, pipeline, queue, settings. Never service.
"""
