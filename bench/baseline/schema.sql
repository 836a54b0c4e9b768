-- The original's table: a plain users table, with no index on email (the cause of its slow
-- lookups is kept on purpose). Created by the benchmark in its own schema, flask_baseline.
CREATE SCHEMA IF NOT EXISTS flask_baseline;
CREATE TABLE IF NOT EXISTS flask_baseline.users (
    id serial PRIMARY KEY,
    email varchar(255) NOT NULL,
    name varchar(255) NOT NULL,
    created_at timestamp NOT NULL DEFAULT now()
);
