import { pino } from "pino";
import { IommufdClient } from "../../client/client.js";
import { DEFAULT_CONFIG } from "../../server/config.js";
import { type RunningServer, startServer } from "../../server/server.js";

/** A real iommufd-service on a free loopback port and a client connected to it. */
export interface TestServer {
  readonly server: RunningServer;
  readonly client: IommufdClient;
  close(): Promise<void>;
}

export async function startTestServer(): Promise<TestServer> {
  const server = await startServer(
    { ...DEFAULT_CONFIG, listen: "127.0.0.1:0", metricsListen: "127.0.0.1:0" },
    pino({ level: process.env.IOMMUFD_TEST_LOG_LEVEL ?? "silent" }),
  );
  const client = new IommufdClient(server.address);
  return {
    server,
    client,
    async close() {
      client.close();
      await server.shutdown();
    },
  };
}
