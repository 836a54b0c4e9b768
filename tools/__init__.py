"""Development and operator-side tools: never in the images, never imported by the service.

``python -m tools <command>`` runs them (see ``tools/__main__.py``).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository's root: hypercorn.toml, the Containerfile, sql/ and the packages."""
