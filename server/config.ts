import { parseArgs } from "node:util";

/** Everything the process is configured with: flags, then env, then defaults. */
export interface Config {
  /** gRPC listen address, HOST:PORT (port 0 picks a free port). */
  readonly listen: string;
  /** Metrics/health HTTP listen address, HOST:PORT, or "off" (no listener, no gRPC metrics). */
  readonly metricsListen: string;
  readonly logLevel: string;
  /** Largest gRPC message accepted or sent, bytes. */
  readonly maxMessageBytes: number;
  /** How long SIGTERM waits for in-flight RPCs before forcing the shutdown. */
  readonly drainTimeoutMs: number;
  /** VMs with their own `vm` label in metrics; the rest are summed under vm="_other". */
  readonly metricsVmLabelCap: number;
}

export const DEFAULT_CONFIG: Config = {
  listen: "127.0.0.1:50051",
  metricsListen: "127.0.0.1:9464",
  logLevel: "info",
  // Big enough for a 8 MiB WriteGuestMemory or a large Translate batch, small
  // enough that one request cannot balloon the process.
  maxMessageBytes: 16 * 1024 * 1024,
  drainTimeoutMs: 10_000,
  metricsVmLabelCap: 1000,
};

export const USAGE = `usage: iommufd-service [options]
  --listen HOST:PORT          gRPC address (env IOMMUFD_LISTEN, default ${DEFAULT_CONFIG.listen})
  --metrics-listen HOST:PORT  /metrics and /healthz, or "off" (env IOMMUFD_METRICS_LISTEN, default ${DEFAULT_CONFIG.metricsListen})
  --log-level LEVEL           pino level: trace debug info warn error (env IOMMUFD_LOG_LEVEL, default info)
  --max-message-bytes N       largest gRPC message (env IOMMUFD_MAX_MESSAGE_BYTES, default ${DEFAULT_CONFIG.maxMessageBytes})
  --drain-timeout-ms N        SIGTERM grace period (env IOMMUFD_DRAIN_TIMEOUT_MS, default ${DEFAULT_CONFIG.drainTimeoutMs})
  --metrics-vm-label-cap N    VMs with their own vm label; the rest are vm="_other" (env IOMMUFD_METRICS_VM_LABEL_CAP, default ${DEFAULT_CONFIG.metricsVmLabelCap})
  --help                      this text`;

const HOST_PORT = /^(\[[0-9a-fA-F:.]+\]|[^\s:]+):(\d{1,5})$/;

export class ConfigError extends Error {}

function hostPort(value: string, what: string): string {
  const m = HOST_PORT.exec(value);
  if (!m || Number(m[2]) > 65535) throw new ConfigError(`${what} must be HOST:PORT, got "${value}"`);
  return value;
}

function positiveInt(value: string, what: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n <= 0) throw new ConfigError(`${what} must be a positive integer, got "${value}"`);
  return n;
}

/** Parses argv and env; throws ConfigError on bad input. Returns undefined for --help. */
export function loadConfig(argv: string[], env: NodeJS.ProcessEnv): Config | undefined {
  const { values } = parseArgs({
    args: argv,
    options: {
      listen: { type: "string" },
      "metrics-listen": { type: "string" },
      "log-level": { type: "string" },
      "max-message-bytes": { type: "string" },
      "drain-timeout-ms": { type: "string" },
      "metrics-vm-label-cap": { type: "string" },
      help: { type: "boolean" },
    },
    strict: true,
  });
  if (values.help) return undefined;
  // A setting comes from its flag, else its env variable; errors name the source.
  const pick = <T>(flag: keyof typeof values, envName: string, parse: (value: string, what: string) => T, fallback: T): T => {
    const fromFlag = values[flag] as string | undefined;
    if (fromFlag !== undefined) return parse(fromFlag, `--${flag}`);
    const fromEnv = env[envName];
    return fromEnv === undefined ? fallback : parse(fromEnv, envName);
  };
  const text = (value: string) => value;
  return {
    listen: pick("listen", "IOMMUFD_LISTEN", hostPort, DEFAULT_CONFIG.listen),
    metricsListen: pick("metrics-listen", "IOMMUFD_METRICS_LISTEN", (v, what) => (v === "off" ? v : hostPort(v, what)), DEFAULT_CONFIG.metricsListen),
    logLevel: pick("log-level", "IOMMUFD_LOG_LEVEL", text, DEFAULT_CONFIG.logLevel),
    maxMessageBytes: pick("max-message-bytes", "IOMMUFD_MAX_MESSAGE_BYTES", positiveInt, DEFAULT_CONFIG.maxMessageBytes),
    drainTimeoutMs: pick("drain-timeout-ms", "IOMMUFD_DRAIN_TIMEOUT_MS", positiveInt, DEFAULT_CONFIG.drainTimeoutMs),
    metricsVmLabelCap: pick("metrics-vm-label-cap", "IOMMUFD_METRICS_VM_LABEL_CAP", positiveInt, DEFAULT_CONFIG.metricsVmLabelCap),
  };
}
