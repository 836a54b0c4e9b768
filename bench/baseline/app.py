"""The Flask original, as the article wrote it after its fixes: a psycopg pool, the users
query, an expensive result cached in Redis with a plain get/set, the heavy task handed to
Celery, served by ``gunicorn -w 4 --threads 4``.

Three things are the benchmark's, not the article's: the connection settings come from the
environment; BASELINE_SCHEMA picks the table (``flask_baseline``, no index: the seed's
problem; ``flask_fixed``, with the article's index on email: bench/baseline/fixed.sql); and
each computation of the expensive result is counted with a Redis INCR so the stampede
scenario can report how many times it ran.
"""

import json
import os

import redis
from flask import Flask, Response, jsonify, request
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from tasks import heavy_task

app = Flask(__name__)
pool = ConnectionPool(
    os.environ["DATABASE_URL"],
    min_size=4,
    max_size=4,
    kwargs={
        "row_factory": dict_row,
        "options": "-c search_path=" + os.environ.get("BASELINE_SCHEMA", "flask_baseline"),
    },
    open=True,
)
cache = redis.Redis.from_url(os.environ["REDIS_URL"])
CACHE_KEY = "expensive_result"
COUNTER_KEY = "bench:computations"


@app.route("/users")
def get_users():
    email = request.args.get("email")
    with pool.connection() as conn:
        users = conn.execute("SELECT * FROM users WHERE email = %s", (email,)).fetchall()
    return jsonify({"users": users})


@app.route("/heavy-task")
def heavy():
    n = int(request.args.get("n", 10**7))
    result = heavy_task.delay(n).get(timeout=120)
    return jsonify({"result": result})


def compute_report():
    with pool.connection() as conn:
        total = conn.execute("SELECT count(*) AS total FROM users").fetchone()["total"]
        domains = conn.execute(
            "SELECT split_part(email, '@', 2) AS domain, count(*) AS users"
            " FROM users GROUP BY 1 ORDER BY 2 DESC, 1"
        ).fetchall()
        days = conn.execute(
            "SELECT created_at::date::text AS day, count(*) AS users"
            " FROM users GROUP BY 1 ORDER BY 1"
        ).fetchall()
    return {"total_users": total, "users_per_domain": domains, "signups_per_day": days}


@app.route("/expensive-operation")
def expensive():
    cached = cache.get(CACHE_KEY)
    if cached:
        return Response(cached, mimetype="application/json")
    cache.incr(COUNTER_KEY)
    body = json.dumps({"result": compute_report()})
    cache.set(CACHE_KEY, body, ex=600)
    return Response(body, mimetype="application/json")
