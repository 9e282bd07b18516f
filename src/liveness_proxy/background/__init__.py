"""Background work of one process: one worker drives every kind of durable job.

    worker.py      `BackgroundWorker`: claims due jobs with a lease, runs them within each kind's
                   concurrency budget, wakes on a timer or when told new work is due
    finalizer.py   `Finalizer`: follows a session to its verdict by reading its result upstream
    webhooks.py    `WebhookDeliveries`: one signed attempt per claim, retries on a schedule
    retention.py   `RetentionSweeper`: the one periodic job, the retention sweep, on one replica at a time

The jobs themselves are rows in the database (store/jobs.py); see docs/reliability.md.
"""

from liveness_proxy.background.finalizer import Finalizer, FinalizerSchedule
from liveness_proxy.background.webhooks import RetrySchedule, WebhookDeliveries
from liveness_proxy.background.worker import BackgroundWorker, JobRunner

__all__ = [
    "BackgroundWorker",
    "Finalizer",
    "FinalizerSchedule",
    "JobRunner",
    "RetrySchedule",
    "WebhookDeliveries",
]
