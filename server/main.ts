import { pino } from "pino";
import { ConfigError, type Config, loadConfig, USAGE } from "./config.js";
import { startServer } from "./server.js";

/** The iommufd-service process: config, listeners, signals, drain. */

let config: Config | undefined;
try {
  config = loadConfig(process.argv.slice(2), process.env);
} catch (e) {
  if (!(e instanceof ConfigError || (e as { code?: string }).code?.startsWith("ERR_PARSE_ARGS"))) throw e;
  process.stderr.write(`iommufd-service: ${(e as Error).message}\n${USAGE}\n`);
  process.exit(2);
}
if (config === undefined) {
  process.stdout.write(`${USAGE}\n`);
  process.exit(0);
}

// Synchronous writes: the server logs lifecycle events and errors, never per
// call, and an asynchronous stdout whose reader went away (a closed pipe)
// would keep pino's exit-time flush retrying, so SIGTERM could not end the process.
const log = pino({ name: "iommufd-service", level: config.logLevel }, pino.destination({ dest: 1, sync: true }));

try {
  const server = await startServer(config, log);
  const stop = (signal: NodeJS.Signals) => {
    log.info({ signal }, "shutting down");
    server.shutdown().then(() => {
      log.info("stopped");
      process.exit(0);
    });
  };
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
} catch (e) {
  log.fatal({ err: e }, "failed to start");
  process.exit(1);
}
