-- name: count_users()$
-- Every user; an index-only scan of the primary key once the table is vacuumed.
SELECT count(*) FROM users;

-- name: top_domains(top)
-- Users per e-mail domain (lower case), the largest first, with the number of distinct domains;
-- a full scan and a hash aggregate, so its cost grows with the table: the reason it is cached.
SELECT domain, users, count(*) OVER () AS distinct_domains
  FROM (SELECT lower(split_part(email, '@', 2)) AS domain, count(*) AS users
          FROM users
         GROUP BY 1) AS per_domain
 ORDER BY users DESC, domain
 LIMIT :top;

-- name: signups_per_day(days)
-- Sign-ups per UTC day over the last :days days including today, zero for a day without any;
-- the window's rows are found through users_created_at_idx.
WITH window_start AS (
    SELECT (now() AT TIME ZONE 'UTC')::date - (CAST(:days AS integer) - 1) AS first_day
), counted AS (
    SELECT (u.created_at AT TIME ZONE 'UTC')::date AS day, count(*) AS users
      FROM users AS u, window_start AS w
     WHERE u.created_at >= (w.first_day::timestamp AT TIME ZONE 'UTC')
     GROUP BY 1
)
SELECT d.day::date AS day, coalesce(c.users, 0) AS users
  FROM window_start AS w,
       generate_series(w.first_day, (now() AT TIME ZONE 'UTC')::date, interval '1 day') AS d(day)
  LEFT JOIN counted AS c ON c.day = d.day::date
 ORDER BY d.day;
