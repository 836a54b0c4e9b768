-- name: get_user_by_id(id)^
-- One user by id.
SELECT id, email, name, created_at, updated_at
  FROM users
 WHERE id = :id;

-- name: find_users_by_email(email_key)
-- The Flask route's lookup, by the address's key (service/emails.py), served by
-- users_email_key_key.
SELECT id, email, name, created_at, updated_at
  FROM users
 WHERE email_key = :email_key;

-- name: list_users_after(after_id, limit)
-- One page of users in id order after a cursor: keyset pagination, never OFFSET.
SELECT id, email, name, created_at, updated_at
  FROM users
 WHERE id > :after_id
 ORDER BY id
 LIMIT :limit;

-- name: create_user(email, email_key, name)<!
-- Insert a user; an e-mail whose key is taken (the same address) raises a unique violation.
INSERT INTO users (email, email_key, name)
VALUES (:email, :email_key, :name)
RETURNING id, email, name, created_at, updated_at;

-- name: update_user(id, email, email_key, name)^
-- Change the given fields (NULL keeps the current value; the e-mail and its key change
-- together); no row when the id is unknown.
UPDATE users
   SET email = coalesce(:email, email),
       email_key = coalesce(:email_key, email_key),
       name = coalesce(:name, name),
       updated_at = now()
 WHERE id = :id
RETURNING id, email, name, created_at, updated_at;

-- name: delete_user(id)$
-- Delete a user; returns its id, or NULL when there was none.
DELETE FROM users
 WHERE id = :id
RETURNING id;
