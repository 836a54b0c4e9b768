-- The original's table with the article's fix: the same plain users table, in schema
-- flask_fixed, with an index on email. The original's query is `WHERE email = %s` (no lower()),
-- so the plain-column form is the index that serves it.
CREATE SCHEMA IF NOT EXISTS flask_fixed;
CREATE TABLE IF NOT EXISTS flask_fixed.users (
    id serial PRIMARY KEY,
    email varchar(255) NOT NULL,
    name varchar(255) NOT NULL,
    created_at timestamp NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS users_email_idx ON flask_fixed.users (email);
