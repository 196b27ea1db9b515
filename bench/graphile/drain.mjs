// graphile-worker side of bench/per_item.py and bench/always_on.py.
//   node drain.mjs migrate CONNECTION      installs graphile-worker's schema
//   node drain.mjs drain CONNECTION N C [PROCEDURE]
//                                          runs log_item jobs (each a CALL PROCEDURE,
//                                          log_item by default) with concurrency C until N
//                                          of them completed, then stops; jobs added
//                                          meanwhile are picked up as they come
//                                          (LISTEN/NOTIFY). Prints {"seconds": ...}: the
//                                          time from the first job's start to the N-th
//                                          job's completion, as graphile-worker's own
//                                          events report them (no poller, no process start)
import { performance } from "node:perf_hooks";
import { Logger, run, runMigrations } from "graphile-worker";

const [mode, connectionString, expected, concurrency, procedure = "log_item"] = process.argv.slice(2);
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
  let firstStart = null;
  let completed = 0;
  let failed = 0;
  const done = new Promise((resolve) => {
    runner.events.on("job:start", () => {
      firstStart ??= performance.now();
    });
    runner.events.on("job:complete", ({ error }) => {
      if (error) failed += 1;
      completed += 1;
      if (completed === Number(expected)) resolve(performance.now());
    });
  });
  const lastComplete = await done;
  await runner.stop();
  console.log(JSON.stringify({ seconds: (lastComplete - firstStart) / 1000, completed, failed }));
}
