"""The audit log: one record per liveness request, appended durably before the response."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store.tables import audit_records


@dataclass(frozen=True, slots=True)
class AuditRecord:
    occurred_at: float
    request_id: str
    subject: str | None
    credential_id: str | None
    action: str
    session_id: str | None
    status: int
    upstream_status: int | None
    latency_ms: float
    problem: str | None


class AuditLog:
    """Append-only audit records. `append` returns once the record is committed."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def close(self) -> None:
        """Flushes pending records (none yet: every append commits on its own)."""

    async def append(self, record: AuditRecord) -> None:
        async with self._engine.begin() as connection:
            await _insert_audit(connection, [record])

    async def iterate(self, *, batch_size: int = 1000) -> AsyncIterator[dict[str, Any]]:
        """Every record in order of insertion, as plain dicts (for export)."""
        last_id = 0
        while True:
            async with self._engine.connect() as connection:
                rows = (
                    await connection.execute(
                        select(audit_records)
                        .where(audit_records.c.id > last_id)
                        .order_by(audit_records.c.id)
                        .limit(batch_size)
                    )
                ).all()
            if not rows:
                return
            for row in rows:
                # Column names come back as quoted_name (a str subclass): make them plain str.
                yield {str(key): value for key, value in row._mapping.items()}
            last_id = rows[-1].id

    async def count(self) -> int:
        async with self._engine.connect() as connection:
            total = (await connection.execute(select(func.count()).select_from(audit_records))).scalar_one()
        return int(total)


async def _insert_audit(connection: AsyncConnection, records: Sequence[AuditRecord]) -> None:
    await connection.execute(insert(audit_records), [asdict(record) for record in records])
