"""Webhook signatures, under the Standard Webhooks convention (``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256>``), made by the
convention's own library.

Each API key has its own signing secret, derived, never stored: HMAC-SHA256 of
``WEBHOOK_SECRET`` and the key's name, shown as ``whsec_<base64>``. The key's owner gets it
from the operator (``webhook_secret(settings, name)``, printed by ``python -m service keygen``
alongside the key); rotating ``WEBHOOK_SECRET`` rotates every key's secret.
"""

from __future__ import annotations

import base64
import hmac
from datetime import UTC, datetime

from standardwebhooks import Webhook


def webhook_secret(server_secret: str, key_name: str) -> str:
    """The signing secret of the API key ``key_name`` ("" when keys are off)."""
    digest = hmac.new(server_secret.encode(), f"webhook\0{key_name}".encode(), "sha256").digest()
    return "whsec_" + base64.b64encode(digest).decode()


def signed_headers(
    secret: str, message_id: str, body: bytes, now: datetime | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body``, sent as ``message_id``."""
    timestamp = now or datetime.now(UTC)
    signature = Webhook(secret).sign(message_id, timestamp, body)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
    }
