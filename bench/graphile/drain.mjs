// graphile-worker side of bench/per_item.py.
//   node drain.mjs migrate CONNECTION      installs graphile-worker's schema
//   node drain.mjs drain CONNECTION N C [PROCEDURE TABLE]
//                                          runs the log_item jobs (CALL PROCEDURE, log_item by
//                                          default) with concurrency C until TABLE (log) holds
//                                          N rows, then stops; jobs added meanwhile are
//                                          picked up as they come (LISTEN/NOTIFY)
import { Logger, run, runMigrations } from "graphile-worker";
import pg from "pg";

const [mode, connectionString, expected, concurrency, procedure = "log_item", table = "log"] =
  process.argv.slice(2);
const quiet = new Logger(() => () => {});

if (mode === "migrate") {
  await runMigrations({ connectionString, logger: quiet });
} else {
  const runner = await run({
    connectionString,
    concurrency: Number(concurrency),
    noHandleSignals: true,
    pollInterval: 100,
    logger: quiet,
    taskList: {
      log_item: async (payload, helpers) => {
        await helpers.query(`CALL ${procedure}($1)`, [payload.k]);
      },
    },
  });
  const pool = new pg.Pool({ connectionString, max: 1 });
  for (;;) {
    const { rows } = await pool.query(`SELECT count(*)::int AS n FROM ${table}`);
    if (rows[0].n >= Number(expected)) break;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  await runner.stop();
  await pool.end();
}
