import { pino } from "pino";
import { type ClientOptions, IommufdClient } from "../../client/client.js";
import { type Config, DEFAULT_CONFIG } from "../../server/config.js";
import { type RunningServer, startServer } from "../../server/server.js";

/** A real iommufd-service on a free loopback port and a client connected to it. */
export interface TestServer {
  readonly server: RunningServer;
  readonly client: IommufdClient;
  close(): Promise<void>;
}

/**
 * Starts a server with the embedded defaults, on free loopback ports, with
 * `overrides` (e.g. { limits: { ...DEFAULT_CONFIG.limits, vmsPerTenant: 2 } }
 * or tls), and a plaintext client unless `clientOptions` says otherwise.
 */
export async function startTestServer(overrides: Partial<Config> = {}, clientOptions?: ClientOptions): Promise<TestServer> {
  const server = await startServer(
    { ...DEFAULT_CONFIG, listen: "127.0.0.1:0", metricsListen: "127.0.0.1:0", ...overrides },
    pino({ level: process.env.IOMMUFD_TEST_LOG_LEVEL ?? "silent" }),
  );
  const client = new IommufdClient(server.address, clientOptions);
  return {
    server,
    client,
    async close() {
      client.close();
      await server.shutdown();
    },
  };
}
