"""The async rewrite of the Flask service: Quart on Hypercorn, asyncpg, Redis, arq."""
