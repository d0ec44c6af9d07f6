"""The interaction store: one interface (:class:`InteractionStore`), two engines."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.store.base import InteractionStore, StoredEvent

if TYPE_CHECKING:
    from app.config_sections import StoreConfig

__all__ = ["InteractionStore", "StoredEvent", "open_store"]


def open_store(cfg: StoreConfig, migrate: bool = True) -> InteractionStore:
    """Open the configured engine and bring its schema up to date."""
    if cfg.engine == "sqlite":
        from app.store.sqlite import SQLiteStore

        store: InteractionStore = SQLiteStore(cfg.sqlite_path)
    else:
        from app.store.postgres import PostgresStore

        store = PostgresStore(cfg.postgres_dsn, pool_size=cfg.pool_size, sslmode=cfg.postgres_sslmode)
    if cfg._encryption is not None:
        from app.privacy.encryption import DataCipher

        try:
            store.cipher = DataCipher.from_settings(cfg._encryption)
        except Exception:
            store.close()
            raise
    if migrate:
        store.migrate()
    return store
