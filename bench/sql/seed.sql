-- name: database_exists(name)$
-- Whether a database of that name exists on the server.
SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = :name);

-- name: create_bench_database()#
-- The benchmark's own database, so a run never touches anyone else's tables.
CREATE DATABASE bench;

-- name: create_soak_database()#
-- The soak's own database (bench/soak.py), so its writes never change the benchmark's tables.
CREATE DATABASE soak;

-- name: count_service_users()$
-- Rows in the service's users table (public schema of the bench database).
SELECT count(*) FROM public.users;

-- name: count_flask_users()$
-- Rows in the Flask original's users table.
SELECT count(*) FROM flask_baseline.users;

-- name: clear_service_users()#
-- Empty the service's table (and anything referencing it) before seeding again.
TRUNCATE public.users RESTART IDENTITY CASCADE;

-- name: clear_flask_users()#
-- Empty the Flask original's table before seeding again.
TRUNCATE flask_baseline.users RESTART IDENTITY;

-- name: seed_service_users(slots, count)!
-- User i gets user<i>@<slots[i % n]> (bench/wrk/load.lua draws e-mails the same way) and a
-- sign-up time spread over two years.
INSERT INTO public.users (email, name, created_at)
SELECT 'user' || i || '@' || d.slots[i % cardinality(d.slots) + 1],
       'User ' || i,
       now() - ((i::bigint * 7919) % 63072000) * interval '1 second'
  FROM (SELECT CAST(:slots AS text[]) AS slots) AS d,
       generate_series(1, CAST(:count AS integer)) AS i;

-- name: seed_flask_users(slots, count)!
-- The same users in the Flask original's table.
INSERT INTO flask_baseline.users (email, name, created_at)
SELECT 'user' || i || '@' || d.slots[i % cardinality(d.slots) + 1],
       'User ' || i,
       now() - ((i::bigint * 7919) % 63072000) * interval '1 second'
  FROM (SELECT CAST(:slots AS text[]) AS slots) AS d,
       generate_series(1, CAST(:count AS integer)) AS i;

-- name: analyze_users()#
-- Fresh planner statistics for both tables after seeding.
ANALYZE public.users;
ANALYZE flask_baseline.users;

-- name: users_table_scans(schema)$
-- Scans of a users table so far (sequential + index): the report reads the table each time it
-- is computed, so the change over a stampede counts computations, whatever the cache does.
SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0)
  FROM pg_stat_user_tables
 WHERE schemaname = :schema AND relname = 'users';
