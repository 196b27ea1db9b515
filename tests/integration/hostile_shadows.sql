-- What a hostile role builds to hijack SQL that runs with someone else's rights: in a
-- schema of its own, for every pg_catalog function, aggregate and operator named in
-- `names` / `ops`, an overload with the very same signature (which wins wherever the
-- schema comes before pg_catalog on the search_path, as `SET search_path = evil,
-- pg_catalog` puts it), plus concrete-typed overloads of count() that beat count("any").
-- Each one logs the role it runs as (RAISE LOG: outside any transaction, so a hit in a
-- statement that is later rolled back is still seen), then does what the original does.
-- Run as the hostile role, which owns the schema `evil`.

CREATE FUNCTION evil.hit(what text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog AS $$
BEGIN
    RAISE LOG 'hostile-hit db=% user=% name=%', pg_catalog.current_database(), current_user, what;
END $$;

CREATE FUNCTION evil.make_shadows(names text[], ops text[]) RETURNS TABLE (kind text, made int, failed int)
LANGUAGE plpgsql SET search_path = pg_catalog AS $make$
DECLARE
    -- Pseudo-types a SQL-language function cannot take or return.
    unusable constant regtype[] := ARRAY['internal', 'cstring', '"any"', 'trigger',
        'event_trigger', 'language_handler', 'fdw_handler', 'index_am_handler',
        'tsm_handler', 'table_am_handler', 'pg_ddl_command']::regtype[];
    p record;
    call_args text;
    made_f int := 0; failed_f int := 0;
    made_a int := 0; failed_a int := 0;
    made_o int := 0; failed_o int := 0;
    t text;
BEGIN
    -- Plain functions: same arguments (names, defaults, VARIADIC), same result.
    FOR p IN
        SELECT f.oid, f.proname, f.pronargs, f.provariadic,
               pg_get_function_arguments(f.oid) AS args,
               pg_get_function_result(f.oid) AS result
          FROM pg_proc f
         WHERE f.pronamespace = 'pg_catalog'::regnamespace AND f.prokind = 'f'
           AND f.proname = ANY (names)
           AND NOT f.prorettype = ANY (unusable)
           AND NOT EXISTS (SELECT FROM unnest(f.proargtypes::oid[]) a WHERE a = ANY (unusable::oid[]))
    LOOP
        SELECT string_agg(CASE WHEN i = p.pronargs AND p.provariadic <> 0 THEN 'VARIADIC ' ELSE '' END || '$' || i, ', ')
          INTO call_args FROM generate_series(1, p.pronargs) i;
        BEGIN
            EXECUTE format(
                'CREATE FUNCTION evil.%I(%s) RETURNS %s LANGUAGE sql VOLATILE SET search_path = pg_catalog AS %L',
                p.proname, p.args, p.result,
                format('SELECT evil.hit(%L); SELECT * FROM pg_catalog.%I(%s)',
                       p.proname, p.proname, coalesce(call_args, '')));
            made_f := made_f + 1;
        EXCEPTION WHEN others THEN
            failed_f := failed_f + 1;
        END;
    END LOOP;

    -- Aggregates whose state is an ordinary type (min, max, sum(int4), count(*), ...).
    FOR p IN
        SELECT f.oid, f.proname, f.pronargs, a.aggtransfn, a.agginitval,
               format_type(a.aggtranstype, NULL) AS stype,
               coalesce((SELECT string_agg(format_type(x, NULL), ', ' ORDER BY o)
                           FROM unnest(f.proargtypes::oid[]) WITH ORDINALITY u(x, o)), '*') AS argtypes
          FROM pg_proc f JOIN pg_aggregate a ON a.aggfnoid = f.oid
         WHERE f.pronamespace = 'pg_catalog'::regnamespace AND a.aggkind = 'n'
           AND f.proname = ANY (names) AND a.aggfinalfn = 0 AND NOT f.proretset
           AND NOT a.aggtranstype = ANY (unusable::oid[])
           AND NOT EXISTS (SELECT FROM unnest(f.proargtypes::oid[]) x WHERE x = ANY (unusable::oid[]))
           AND NOT EXISTS (SELECT FROM unnest((SELECT proargtypes::oid[] FROM pg_proc WHERE oid = a.aggtransfn)) x
                            WHERE x = ANY (unusable::oid[]))
    LOOP
        BEGIN
            EXECUTE format(
                'CREATE FUNCTION evil.%I(%s) RETURNS %s LANGUAGE sql VOLATILE SET search_path = pg_catalog AS %L',
                'step_' || p.oid, p.stype || CASE WHEN p.argtypes = '*' THEN '' ELSE ', ' || p.argtypes END, p.stype,
                format('SELECT evil.hit(%L); SELECT %s(%s)', p.proname, p.aggtransfn::regproc,
                       (SELECT string_agg('$' || i, ', ') FROM generate_series(1, p.pronargs + 1) i)));
            EXECUTE format('CREATE AGGREGATE evil.%I(%s) (sfunc = evil.%I, stype = %s%s)',
                p.proname, p.argtypes, 'step_' || p.oid, p.stype,
                CASE WHEN p.agginitval IS NULL THEN '' ELSE format(', initcond = %L', p.agginitval) END);
            made_a := made_a + 1;
        EXCEPTION WHEN others THEN
            failed_a := failed_a + 1;
        END;
    END LOOP;
    -- count(x) is count("any") in pg_catalog: an exactly typed overload is a better match.
    IF 'count' = ANY (names) THEN
        FOREACH t IN ARRAY ARRAY['bigint', 'integer', 'text', 'oid', 'jsonb', 'boolean', 'timestamptz'] LOOP
            EXECUTE format(
                'CREATE FUNCTION evil.%I(bigint, %s) RETURNS bigint LANGUAGE sql VOLATILE SET search_path = pg_catalog AS %L',
                'count_step_' || replace(t, ' ', '_'), t, 'SELECT evil.hit(''count''); SELECT $1 + 1');
            EXECUTE format('CREATE AGGREGATE evil.count(%s) (sfunc = evil.%I, stype = bigint, initcond = 0)',
                t, 'count_step_' || replace(t, ' ', '_'));
            made_a := made_a + 1;
        END LOOP;
    END IF;

    -- Operators: the same symbol and operand types, over a function that logs.
    FOR p IN
        SELECT o.oid, o.oprname, o.oprleft, o.oprright,
               format_type(o.oprresult, NULL) AS result
          FROM pg_operator o
         WHERE o.oprnamespace = 'pg_catalog'::regnamespace AND o.oprname = ANY (ops)
           AND NOT o.oprleft = ANY (unusable::oid[]) AND NOT o.oprright = ANY (unusable::oid[])
           AND NOT o.oprresult = ANY (unusable::oid[])
    LOOP
        BEGIN
            IF p.oprleft = 0 THEN
                EXECUTE format(
                    'CREATE FUNCTION evil.%I(%s) RETURNS %s LANGUAGE sql VOLATILE SET search_path = pg_catalog AS %L',
                    'op_' || p.oid, format_type(p.oprright, NULL), p.result,
                    format('SELECT evil.hit(%L); SELECT OPERATOR(pg_catalog.%s) $1', p.oprname, p.oprname));
                EXECUTE format('CREATE OPERATOR evil.%s (function = evil.%I, rightarg = %s)',
                    p.oprname, 'op_' || p.oid, format_type(p.oprright, NULL));
            ELSE
                EXECUTE format(
                    'CREATE FUNCTION evil.%I(%s, %s) RETURNS %s LANGUAGE sql VOLATILE SET search_path = pg_catalog AS %L',
                    'op_' || p.oid, format_type(p.oprleft, NULL), format_type(p.oprright, NULL), p.result,
                    format('SELECT evil.hit(%L); SELECT $1 OPERATOR(pg_catalog.%s) $2', p.oprname, p.oprname));
                EXECUTE format('CREATE OPERATOR evil.%s (function = evil.%I, leftarg = %s, rightarg = %s)',
                    p.oprname, 'op_' || p.oid, format_type(p.oprleft, NULL), format_type(p.oprright, NULL));
            END IF;
            made_o := made_o + 1;
        EXCEPTION WHEN others THEN
            failed_o := failed_o + 1;
        END;
    END LOOP;

    RETURN QUERY VALUES ('function', made_f, failed_f), ('aggregate', made_a, failed_a),
                        ('operator', made_o, failed_o);
END $make$;
