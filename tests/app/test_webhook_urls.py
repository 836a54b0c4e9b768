"""Where a webhook may go (service/webhooks/urls.py) and how it is signed
(service/webhooks/signing.py)."""

from __future__ import annotations

import ipaddress

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from service.webhooks.signing import signed_headers, webhook_secret
from service.webhooks.urls import Allow, RefusedURL, check

NOTHING = Allow()


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",
        "https://127.0.0.1/hook",
        "https://10.0.0.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://localhost/hook",  # a name that resolves to loopback
        "https://user:pw@example.com/hook",
        "ftp://example.com/hook",
        "https:///hook",
    ],
)
async def test_a_callback_url_to_an_internal_address_or_without_https_is_refused(url: str) -> None:
    with pytest.raises(RefusedURL):
        await check(url, NOTHING)


async def test_a_public_address_passes_and_is_the_one_to_connect_to() -> None:
    target = await check("https://93.184.215.14:8443/hook", NOTHING)
    assert target.address == ipaddress.ip_address("93.184.215.14")
    assert target.port == 8443


async def test_webhook_allow_admits_a_host_or_a_network_over_http_too() -> None:
    by_network = Allow.parse("127.0.0.0/8")
    assert (await check("http://127.0.0.1:9/hook", by_network)).port == 9
    by_host = Allow.parse("localhost")
    assert (await check("https://localhost/hook", by_host)).host == "localhost"
    with pytest.raises(RefusedURL):
        await check("https://10.0.0.1/hook", by_network)


def test_a_signed_body_verifies_with_the_keys_secret_only() -> None:
    secret = webhook_secret("server-secret-of-enough-length", "alice")
    body = b'{"id":"x","status":"complete"}'
    headers = signed_headers(secret, "msg_1", body)
    assert Webhook(secret).verify(body, headers) == {"id": "x", "status": "complete"}
    other = webhook_secret("server-secret-of-enough-length", "bob")
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
