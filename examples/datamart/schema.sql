-- A small data warehouse in the shape of the problem pg_chunkwise was built for:
-- a users dimension with a "modified" flag, a facts table of user actions with skewed
-- activity, and a per-user datamart row recomputed by a heavy-ish procedure.
CREATE SCHEMA dwh;

CREATE TABLE dwh.dimension_users (
    dimension_user_id bigint PRIMARY KEY,
    name              text NOT NULL,
    country           text NOT NULL,
    signed_up         timestamptz NOT NULL,
    modified          boolean NOT NULL DEFAULT true
);

CREATE TABLE dwh.fact_actions (
    action_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES dwh.dimension_users,
    action_type text NOT NULL,           -- view, click, cart, purchase, refund, login
    amount      numeric(12, 2) NOT NULL DEFAULT 0,
    happened_at timestamptz NOT NULL
);
CREATE INDEX ON dwh.fact_actions (user_id, happened_at);

CREATE TABLE dwh.datamart_users (
    user_id            bigint PRIMARY KEY,
    actions_total      bigint, actions_1d bigint, actions_7d bigint, actions_30d bigint, actions_90d bigint,
    views              bigint, clicks bigint, carts bigint, purchases bigint, refunds bigint, logins bigint,
    purchases_30d      bigint, refunds_30d bigint,
    revenue_total      numeric, revenue_7d numeric, revenue_30d numeric, revenue_90d numeric,
    refunded_total     numeric, net_revenue numeric,
    avg_order          numeric, max_order numeric, min_order numeric, stddev_order numeric,
    first_seen         timestamptz, last_seen timestamptz, last_purchase timestamptz,
    active_days        bigint, active_days_30d bigint, active_weeks bigint,
    click_through      numeric, conversion numeric, refund_rate numeric,
    days_since_seen    numeric, tenure_days numeric,
    refreshed_at       timestamptz NOT NULL
);

-- Recomputes one user's datamart row from the facts: the per-entity procedure that
-- used to be called in a one-by-one loop. PL/pgSQL rather than SQL so that it runs
-- unchanged over Citus too (Citus cannot plan parameters of SQL-language functions).
CREATE PROCEDURE dwh.update_datamart_user(p_user bigint)
LANGUAGE plpgsql AS $$
BEGIN
INSERT INTO dwh.datamart_users AS d
SELECT p_user,
       count(*), count(*) FILTER (WHERE happened_at > now() - interval '1 day'),
       count(*) FILTER (WHERE happened_at > now() - interval '7 days'),
       count(*) FILTER (WHERE happened_at > now() - interval '30 days'),
       count(*) FILTER (WHERE happened_at > now() - interval '90 days'),
       count(*) FILTER (WHERE action_type = 'view'), count(*) FILTER (WHERE action_type = 'click'),
       count(*) FILTER (WHERE action_type = 'cart'), count(*) FILTER (WHERE action_type = 'purchase'),
       count(*) FILTER (WHERE action_type = 'refund'), count(*) FILTER (WHERE action_type = 'login'),
       count(*) FILTER (WHERE action_type = 'purchase' AND happened_at > now() - interval '30 days'),
       count(*) FILTER (WHERE action_type = 'refund' AND happened_at > now() - interval '30 days'),
       coalesce(sum(amount) FILTER (WHERE action_type = 'purchase'), 0),
       coalesce(sum(amount) FILTER (WHERE action_type = 'purchase' AND happened_at > now() - interval '7 days'), 0),
       coalesce(sum(amount) FILTER (WHERE action_type = 'purchase' AND happened_at > now() - interval '30 days'), 0),
       coalesce(sum(amount) FILTER (WHERE action_type = 'purchase' AND happened_at > now() - interval '90 days'), 0),
       coalesce(sum(amount) FILTER (WHERE action_type = 'refund'), 0),
       coalesce(sum(amount) FILTER (WHERE action_type = 'purchase'), 0)
         - coalesce(sum(amount) FILTER (WHERE action_type = 'refund'), 0),
       avg(amount) FILTER (WHERE action_type = 'purchase'), max(amount) FILTER (WHERE action_type = 'purchase'),
       min(amount) FILTER (WHERE action_type = 'purchase'), stddev(amount) FILTER (WHERE action_type = 'purchase'),
       min(happened_at), max(happened_at), max(happened_at) FILTER (WHERE action_type = 'purchase'),
       count(DISTINCT happened_at::date),
       count(DISTINCT happened_at::date) FILTER (WHERE happened_at > now() - interval '30 days'),
       count(DISTINCT date_trunc('week', happened_at)),
       round(count(*) FILTER (WHERE action_type = 'click')::numeric / nullif(count(*) FILTER (WHERE action_type = 'view'), 0), 4),
       round(count(*) FILTER (WHERE action_type = 'purchase')::numeric / nullif(count(*) FILTER (WHERE action_type = 'click'), 0), 4),
       round(count(*) FILTER (WHERE action_type = 'refund')::numeric / nullif(count(*) FILTER (WHERE action_type = 'purchase'), 0), 4),
       round(extract(epoch FROM now() - max(happened_at)) / 86400, 2),
       round(extract(epoch FROM now() - min(happened_at)) / 86400, 2),
       clock_timestamp()
  FROM dwh.fact_actions
 WHERE user_id = p_user
ON CONFLICT (user_id) DO UPDATE SET
       actions_total = EXCLUDED.actions_total, actions_1d = EXCLUDED.actions_1d, actions_7d = EXCLUDED.actions_7d,
       actions_30d = EXCLUDED.actions_30d, actions_90d = EXCLUDED.actions_90d, views = EXCLUDED.views,
       clicks = EXCLUDED.clicks, carts = EXCLUDED.carts, purchases = EXCLUDED.purchases, refunds = EXCLUDED.refunds,
       logins = EXCLUDED.logins, purchases_30d = EXCLUDED.purchases_30d, refunds_30d = EXCLUDED.refunds_30d,
       revenue_total = EXCLUDED.revenue_total, revenue_7d = EXCLUDED.revenue_7d, revenue_30d = EXCLUDED.revenue_30d,
       revenue_90d = EXCLUDED.revenue_90d, refunded_total = EXCLUDED.refunded_total, net_revenue = EXCLUDED.net_revenue,
       avg_order = EXCLUDED.avg_order, max_order = EXCLUDED.max_order, min_order = EXCLUDED.min_order,
       stddev_order = EXCLUDED.stddev_order, first_seen = EXCLUDED.first_seen, last_seen = EXCLUDED.last_seen,
       last_purchase = EXCLUDED.last_purchase, active_days = EXCLUDED.active_days,
       active_days_30d = EXCLUDED.active_days_30d, active_weeks = EXCLUDED.active_weeks,
       click_through = EXCLUDED.click_through, conversion = EXCLUDED.conversion, refund_rate = EXCLUDED.refund_rate,
       days_since_seen = EXCLUDED.days_since_seen, tenure_days = EXCLUDED.tenure_days,
       refreshed_at = EXCLUDED.refreshed_at;
END
$$;

-- What needs refreshing, with what the activity ranking needs.
CREATE VIEW dwh.modified_users AS
SELECT u.dimension_user_id AS key,
       f.last_activity,
       coalesce(f.actions, 0) AS actions
  FROM dwh.dimension_users u
  LEFT JOIN LATERAL (SELECT max(happened_at) AS last_activity, count(*) AS actions
                       FROM dwh.fact_actions a WHERE a.user_id = u.dimension_user_id) f ON true
 WHERE u.modified;
