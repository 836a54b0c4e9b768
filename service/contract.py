"""Facts of the HTTP contract that several modules need, each stated once here.

No Quart import: the container's health check and the operator commands read it too.
"""

from __future__ import annotations

# The probes of orchestrators and load balancers: never a key, never a rate limit, nothing to
# validate (service/pipeline/auth.py, service/routes/openapi.py, service/routes/health.py).
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
PROBE_PATHS = frozenset({LIVENESS_PATH, READINESS_PATH})

# Methods that carry a JSON body the service reads and checks (service/pipeline/body.py).
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The scopes follow the method: reading needs `read`, changing needs `write`.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WRITE_METHODS = BODY_METHODS | {"DELETE"}
# Every method a route or CORS may use; metrics label anything else "OTHER".
METHODS = READ_METHODS | WRITE_METHODS
