-- name: database_exists(name)$
-- Whether a database of that name exists on the server.
SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = :name);

-- name: create_database_statement(name)$
-- The statement creating a database of that name, the name quoted by PostgreSQL itself
-- (a database name cannot be a bind parameter of CREATE DATABASE).
SELECT format('CREATE DATABASE %I', CAST(:name AS text));

-- name: drop_database_statement(name)$
-- The statement dropping that database, its connections closed first.
SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', CAST(:name AS text));

-- name: create_soak_database()#
-- The soak's own database (bench/soak.py), so its writes never change the benchmark's tables.
CREATE DATABASE soak;

-- name: count_service_users()$
-- Rows in the service's users table (public schema of the bench database).
SELECT count(*) FROM public.users;

-- name: clear_service_users()#
-- Empty the service's table (and anything referencing it) before seeding again.
TRUNCATE public.users RESTART IDENTITY CASCADE;

-- name: seed_service_users(slots, count)!
-- User i gets user<i>@<slots[i % n]> (bench/wrk/load.lua draws e-mails the same way) and a
-- sign-up time spread over two years. In lower-case ASCII an address is its own key
-- (service/emails.py; tests/app/test_bench.py checks the slots).
INSERT INTO public.users (email, email_key, name, created_at)
SELECT a.email, a.email,
       'User ' || i,
       now() - ((i::bigint * 7919) % 63072000) * interval '1 second'
  FROM (SELECT CAST(:slots AS text[]) AS slots) AS d,
       generate_series(1, CAST(:count AS integer)) AS i,
       LATERAL (SELECT 'user' || i || '@' || d.slots[i % cardinality(d.slots) + 1]) AS a(email);

-- name: seed_flask_users(slots, count)!
-- The same users in the Flask original's table.
INSERT INTO flask_baseline.users (email, name, created_at)
SELECT 'user' || i || '@' || d.slots[i % cardinality(d.slots) + 1],
       'User ' || i,
       now() - ((i::bigint * 7919) % 63072000) * interval '1 second'
  FROM (SELECT CAST(:slots AS text[]) AS slots) AS d,
       generate_series(1, CAST(:count AS integer)) AS i;

-- name: copy_flask_users_to_fixed()!
-- The same users again in the fixed original's table (bench/baseline/fixed.sql), whose index
-- is the article's fix.
INSERT INTO flask_fixed.users (id, email, name, created_at)
SELECT id, email, name, created_at FROM flask_baseline.users;

-- name: analyze_users()#
-- Fresh planner statistics for the three tables after seeding.
ANALYZE public.users;
ANALYZE flask_baseline.users;
ANALYZE flask_fixed.users;

-- name: users_table_scans(schema)$
-- Scans of a users table so far (sequential + index): the report reads the table each time it
-- is computed, so the change over a stampede counts computations, whatever the cache does.
SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0)
  FROM pg_stat_user_tables
 WHERE schemaname = :schema AND relname = 'users';
