// graphile-worker side of bench/per_item.py.
//   node drain.mjs migrate CONNECTION      installs graphile-worker's schema
//   node drain.mjs drain CONNECTION N C    runs the queued log_item jobs with concurrency C
//                                          until the log table holds N rows, then stops
import { Logger, run, runMigrations } from "graphile-worker";
import pg from "pg";

const [mode, connectionString, expected, concurrency] = process.argv.slice(2);
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
        await helpers.query("CALL log_item($1)", [payload.k]);
      },
    },
  });
  const pool = new pg.Pool({ connectionString, max: 1 });
  for (;;) {
    const { rows } = await pool.query("SELECT count(*)::int AS n FROM log");
    if (rows[0].n >= Number(expected)) break;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  await runner.stop();
  await pool.end();
}
