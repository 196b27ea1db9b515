-- Every object of the pg_chunkwise extension in this database, one line each, with its
-- definition and privileges: relations and their columns, indexes and constraints, views,
-- functions, sequences, event triggers, the schema, comments and the tables pg_dump keeps.
-- No OIDs, so that two databases can be compared line by line.
WITH ext AS (
    SELECT oid, extconfig FROM pg_catalog.pg_extension WHERE extname = 'pg_chunkwise'
), members AS (
    SELECT d.classid, d.objid
      FROM pg_catalog.pg_depend d JOIN ext ON d.refobjid = ext.oid
     WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e'
), relations AS (
    SELECT c.* FROM members m JOIN pg_catalog.pg_class c ON c.oid = m.objid
     WHERE m.classid = 'pg_catalog.pg_class'::regclass
), lines(line) AS (
    SELECT 'member ' || pg_catalog.pg_describe_object(m.classid, m.objid, 0) FROM members m
    UNION ALL
    SELECT format('relation %s kind %s acl %s options %s%s', c.oid::regclass, c.relkind,
                  coalesce(c.relacl::text, '-'), coalesce(c.reloptions::text, '-'),
                  CASE WHEN c.relkind = 'v' THEN ' view ' || pg_catalog.pg_get_viewdef(c.oid) ELSE '' END)
      FROM relations c
    UNION ALL
    SELECT format('column %s.%s #%s %s%s identity %s%s acl %s', a.attrelid::regclass, a.attname,
                  a.attnum, pg_catalog.format_type(a.atttypid, a.atttypmod),
                  CASE WHEN a.attnotnull THEN ' not null' ELSE '' END, a.attidentity,
                  coalesce(' default ' || pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), ''),
                  coalesce(a.attacl::text, '-'))
      FROM relations c
      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
    UNION ALL
    SELECT 'index ' || pg_catalog.pg_get_indexdef(i.indexrelid)
      FROM relations c JOIN pg_catalog.pg_index i ON i.indrelid = c.oid
    UNION ALL
    SELECT format('constraint %s %s %s', con.conrelid::regclass, con.conname,
                  pg_catalog.pg_get_constraintdef(con.oid))
      FROM relations c JOIN pg_catalog.pg_constraint con ON con.conrelid = c.oid
    UNION ALL
    SELECT format('sequence %s %s start %s step %s max %s min %s cache %s cycle %s',
                  s.seqrelid::regclass, pg_catalog.format_type(s.seqtypid, NULL), s.seqstart,
                  s.seqincrement, s.seqmax, s.seqmin, s.seqcache, s.seqcycle)
      FROM relations c JOIN pg_catalog.pg_sequence s ON s.seqrelid = c.oid
    UNION ALL
    SELECT format('function %s acl %s', pg_catalog.pg_get_functiondef(p.oid), coalesce(p.proacl::text, '-'))
      FROM members m JOIN pg_catalog.pg_proc p ON p.oid = m.objid
     WHERE m.classid = 'pg_catalog.pg_proc'::regclass
    UNION ALL
    SELECT format('event trigger %s on %s runs %s tags %s enabled %s', e.evtname, e.evtevent,
                  e.evtfoid::regproc, coalesce(e.evttags::text, '-'), e.evtenabled)
      FROM members m JOIN pg_catalog.pg_event_trigger e ON e.oid = m.objid
     WHERE m.classid = 'pg_catalog.pg_event_trigger'::regclass
    UNION ALL
    SELECT format('schema %s owner %s acl %s', n.nspname, n.nspowner::regrole, coalesce(n.nspacl::text, '-'))
      FROM members m JOIN pg_catalog.pg_namespace n ON n.oid = m.objid
     WHERE m.classid = 'pg_catalog.pg_namespace'::regclass
    UNION ALL
    SELECT format('comment on %s: %s', pg_catalog.pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description)
      FROM members m JOIN pg_catalog.pg_description d ON d.classoid = m.classid AND d.objoid = m.objid
    UNION ALL
    SELECT 'kept by pg_dump: ' || t::regclass FROM ext, unnest(ext.extconfig) t
)
SELECT line FROM lines ORDER BY line
