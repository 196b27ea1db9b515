-- Synthetic warehouse data: :users users (psql variable). Activity is skewed: a few
-- users are very active, most have a handful of actions or none, and last activity
-- is spread over two years with most users long idle.
INSERT INTO dwh.dimension_users (dimension_user_id, name, country, signed_up)
SELECT g, 'user ' || g, (ARRAY['DE', 'FR', 'PL', 'US', 'BR'])[1 + g % 5], now() - interval '3 years' * random()
  FROM generate_series(1, :users) g;

-- Per user: an action count from a heavy-tailed distribution and a recency between
-- today and two years ago (squared, so recent activity is rarer than old).
CREATE TEMP TABLE activity AS
SELECT g AS user_id,
       CASE WHEN random() < 0.15 THEN 0 ELSE floor(2000 * power(random(), 9))::int + 1 END AS actions,
       interval '730 days' * power(random(), 0.7) AS idle_for
  FROM generate_series(1, :users) g;

INSERT INTO dwh.fact_actions (user_id, action_type, amount, happened_at)
SELECT a.user_id,
       (ARRAY['view', 'view', 'view', 'click', 'click', 'cart', 'purchase', 'refund', 'login'])[1 + floor(random() * 9)::int],
       round((random() * 200)::numeric, 2),
       now() - a.idle_for - interval '200 days' * random() * (n > 1)::int
  FROM activity a, generate_series(1, a.actions) n;
-- (A transaction block may load this file: run.sh and the benchmarks VACUUM after it.)
ANALYZE dwh.dimension_users, dwh.fact_actions;
