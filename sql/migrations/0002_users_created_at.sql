-- The report's sign-ups per day reads only the last days' rows: an index on created_at finds
-- them without scanning the table. (Migrations run in a transaction, so not CONCURRENTLY; on a
-- large live table create it by hand with CREATE INDEX CONCURRENTLY first, and this no-ops.)
CREATE INDEX IF NOT EXISTS users_created_at_idx ON users (created_at);
