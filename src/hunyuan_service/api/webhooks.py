"""Webhooks for jobs API jobs: one signed POST when a job ends, retried with backoff.

Signatures follow the Standard Webhooks spec: headers `webhook-id`, `webhook-timestamp` and
`webhook-signature` (`v1,` + base64 of HMAC-SHA256 over `id.timestamp.body`, keyed with the
decoded WEBHOOK_SECRET). Hosts must be in ALLOWED_WEBHOOK_DOMAINS and are resolved and vetted
like media URLs, so a webhook can never reach an internal address. A failing webhook is logged
and given up on; it never touches the job or the worker.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from urllib.parse import urlsplit

from hunyuan_service.errors import ServiceError
from hunyuan_service.media import host_allowed, vetted_address
from hunyuan_service.settings import Settings, webhook_key

logger = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 60.0


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSender:
    """Delivers job-end notifications; `deliver` runs as a background task per job."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        secret = settings.webhook_secret
        self.key = webhook_key(secret.get_secret_value()) if secret is not None else b""
        self.attempts = 0  # every POST tried, for /metrics and tests
        self.delivered = 0
        self.given_up = 0

    def counts(self) -> dict[str, int]:
        """For /metrics: POSTs attempted, webhooks delivered, webhooks given up on."""
        return {"attempted": self.attempts, "delivered": self.delivered, "given_up": self.given_up}

    async def deliver(self, url: str, body: bytes, job_id: str) -> bool:
        """POSTs `body` until a 2xx answer or WEBHOOK_MAX_ATTEMPTS tries; True if delivered."""
        message_id = f"msg_{secrets.token_urlsafe(12)}"
        for attempt in range(1, self.settings.webhook_max_attempts + 1):
            outcome = await self._attempt(url, body, message_id)
            if outcome is None:
                self.delivered += 1
                logger.info("webhook delivered", extra={"job_id": job_id, "attempt": attempt})
                return True
            logger.warning(
                "webhook attempt failed: %s",
                outcome,
                extra={"job_id": job_id, "attempt": attempt},
            )
            if attempt < self.settings.webhook_max_attempts:
                await asyncio.sleep(min(BACKOFF_BASE_S * 2 ** (attempt - 1), BACKOFF_MAX_S))
        self.given_up += 1
        logger.error(
            "webhook given up", extra={"job_id": job_id, "url_host": urlsplit(url).hostname}
        )
        return False

    async def _attempt(self, url: str, body: bytes, message_id: str) -> str | None:
        """One POST; returns None on a 2xx answer, else why it failed."""
        import httpx

        parts = urlsplit(url)
        host = parts.hostname or ""
        if not host_allowed(host, self.settings.allowed_webhook_domains):
            return f"host {host!r} is not in ALLOWED_WEBHOOK_DOMAINS"
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            address = await asyncio.to_thread(
                vetted_address,
                host,
                port,
                allow_private=self.settings.allow_private_webhook_addresses,
                param="webhook",
                setting="ALLOW_PRIVATE_WEBHOOK_ADDRESSES",
            )
        except ServiceError as error:
            return error.message
        literal = f"[{address}]" if ":" in address else address
        target = parts._replace(netloc=f"{literal}:{port}").geturl()
        timestamp = int(time.time())
        headers = {
            "Host": parts.netloc.rsplit("@", 1)[-1],
            "Content-Type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.key, message_id, timestamp, body),
        }
        timeout_s = self.settings.webhook_timeout_s
        self.attempts += 1
        try:
            async with httpx.AsyncClient(
                follow_redirects=False, timeout=timeout_s, trust_env=False
            ) as client:
                response = await asyncio.wait_for(
                    client.post(
                        target, content=body, headers=headers, extensions={"sni_hostname": host}
                    ),
                    timeout=timeout_s,
                )
        except (httpx.HTTPError, asyncio.TimeoutError) as error:
            return type(error).__name__
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"
