-- name: get_user_by_id(id)^
-- One user by id.
SELECT id, email, name, created_at, updated_at
  FROM users
 WHERE id = :id;

-- name: find_users_by_email(email)
-- The Flask route's lookup, case-insensitive, served by users_email_lower_key.
SELECT id, email, name, created_at, updated_at
  FROM users
 WHERE lower(email) = lower(:email);

-- name: list_users_after(after_id, limit)
-- One page of users in id order after a cursor: keyset pagination, never OFFSET.
SELECT id, email, name, created_at, updated_at
  FROM users
 WHERE id > :after_id
 ORDER BY id
 LIMIT :limit;

-- name: create_user(email, name)<!
-- Insert a user; a duplicate e-mail (any case) raises a unique violation.
INSERT INTO users (email, name)
VALUES (:email, :name)
RETURNING id, email, name, created_at, updated_at;

-- name: update_user(id, email, name)^
-- Change the given fields (NULL keeps the current value); no row when the id is unknown.
UPDATE users
   SET email = coalesce(:email, email),
       name = coalesce(:name, name),
       updated_at = now()
 WHERE id = :id
RETURNING id, email, name, created_at, updated_at;

-- name: delete_user(id)$
-- Delete a user; returns its id, or NULL when there was none.
DELETE FROM users
 WHERE id = :id
RETURNING id;
