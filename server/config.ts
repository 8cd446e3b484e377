import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { DEFAULT_LIMITS, type Limits } from "./core/limits.js";

/** Everything the process is configured with: flags, then env, then defaults. */
export interface Config {
  /** gRPC listen address, HOST:PORT (port 0 picks a free port). */
  readonly listen: string;
  /** Metrics/health HTTP listen address, HOST:PORT, or "off" (no listener, no gRPC metrics). */
  readonly metricsListen: string;
  /** A plaintext gRPC port serving only grpc.health.v1.Health (for kubelet probes under mTLS), or "off". */
  readonly healthListen: string;
  readonly logLevel: string;
  /** Largest gRPC message accepted or sent, bytes. */
  readonly maxMessageBytes: number;
  /** How long SIGTERM waits for in-flight RPCs before forcing the shutdown. */
  readonly drainTimeoutMs: number;
  /** VMs with their own `vm` label in metrics; the rest are summed under vm="_other". */
  readonly metricsVmLabelCap: number;
  /** Server certificate chain and key (PEM): serve TLS. */
  readonly tls: { cert: Buffer; key: Buffer; clientCa: Buffer | undefined } | undefined;
  /** Serve plaintext on a non-loopback address. */
  readonly insecure: boolean;
  /** The client identity that may list every tenant's VMs. */
  readonly adminIdentity: string | undefined;
  /** Where VMs are kept across restarts (state-dir.ts), or undefined: in memory only. */
  readonly stateDir: string | undefined;
  /** With stateDir: how often every VM is also snapshotted while running (undefined = only at shutdown). */
  readonly snapshotIntervalMs: number | undefined;
  readonly limits: Limits;
}

export class ConfigError extends Error {}

const HOST_PORT = /^(\[[0-9a-fA-F:.]+\]|[^\s:]+):(\d{1,5})$/;

function hostPort(value: string, what: string): string {
  const m = HOST_PORT.exec(value);
  if (!m || Number(m[2]) > 65535) throw new ConfigError(`${what} must be HOST:PORT, got "${value}"`);
  return value;
}

const hostPortOrOff = (value: string, what: string): string => (value === "off" ? value : hostPort(value, what));

function positiveInt(value: string, what: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n <= 0) throw new ConfigError(`${what} must be a positive integer, got "${value}"`);
  return n;
}

const DURATION_UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** "500ms", "30s", "5m", "1h"; "off" = undefined. */
function durationOrOff(value: string, what: string): number | undefined {
  if (value === "off") return undefined;
  const m = /^(\d+)(ms|s|m|h)$/.exec(value);
  const ms = m ? Number(m[1]) * DURATION_UNIT_MS[m[2]] : 0;
  // Node runs a timer of more than 2^31 - 1 ms after 1 ms: refuse, not hammer.
  if (!Number.isSafeInteger(ms) || ms <= 0 || ms > 2 ** 31 - 1) {
    throw new ConfigError(`${what} must be a duration like 500ms, 30s, 5m, 1h (at most 596h), or "off", got "${value}"`);
  }
  return ms;
}

function pem(value: string, what: string): Buffer {
  try {
    return readFileSync(value);
  } catch (e) {
    throw new ConfigError(`${what}: cannot read "${value}": ${(e as Error).message}`);
  }
}

/** An option: its flag, env variable, parser, default and help. */
interface Option<T> {
  readonly flag: string;
  /** What the value looks like in the usage text. */
  readonly metavar: string;
  readonly env: string;
  readonly parse: (value: string, what: string) => T;
  readonly fallback: T;
  /** The default as the usage text shows it, when not String(fallback). */
  readonly shownDefault?: string;
  readonly help: string;
}

const METAVARS = new Map<Function, string>([
  [hostPort, "HOST:PORT"],
  [hostPortOrOff, "HOST:PORT"],
  [positiveInt, "N"],
  [durationOrOff, "DURATION"],
]);

const opt = <T>(flag: string, parse: (value: string, what: string) => T, fallback: T, help: string, metavar = METAVARS.get(parse) ?? "VALUE"): Option<T> => ({
  flag,
  metavar,
  env: `IOMMUFD_${flag.replaceAll("-", "_").toUpperCase()}`,
  parse,
  fallback,
  help,
});

const text = (value: string) => value;

const OPTIONS = {
  listen: opt("listen", hostPort, "127.0.0.1:50051", "gRPC address (HOST:PORT; port 0 = any free port)"),
  metricsListen: opt("metrics-listen", hostPortOrOff, "127.0.0.1:9464", '/metrics and /healthz (HOST:PORT), or "off"'),
  healthListen: opt("health-listen", hostPortOrOff, "off", 'plaintext gRPC health-only port for probes under mTLS (HOST:PORT), or "off"'),
  logLevel: opt("log-level", text, "info", "pino level: trace debug info warn error", "LEVEL"),
  // Big enough for an 8 MiB WriteGuestMemory or a 64 Ki-IOVA Translate, small
  // enough that one request cannot balloon the process.
  maxMessageBytes: opt("max-message-bytes", positiveInt, 16 * 1024 * 1024, "largest gRPC message, either way"),
  drainTimeoutMs: opt("drain-timeout-ms", positiveInt, 10_000, "SIGTERM grace period"),
  metricsVmLabelCap: opt("metrics-vm-label-cap", positiveInt, 1000, 'VMs with their own vm label; the rest are vm="_other"'),
  tlsCert: opt<string | undefined>("tls-cert", text, undefined, "server certificate chain (PEM file): serve TLS", "FILE"),
  tlsKey: opt<string | undefined>("tls-key", text, undefined, "server private key (PEM file)", "FILE"),
  tlsClientCa: opt<string | undefined>("tls-client-ca", text, undefined, "CA for client certificates (PEM): require them; each identity is a tenant", "FILE"),
  adminIdentity: opt<string | undefined>("admin-identity", text, undefined, "client identity (URI SAN or CN) that may list every tenant's VMs", "ID"),
  stateDir: opt<string | undefined>("state-dir", text, undefined, "keep VMs here across restarts: restored at start, saved at shutdown", "DIR"),
  snapshotInterval: { ...opt<number | undefined>("snapshot-interval", durationOrOff, 30_000, 'with --state-dir, also save every VM this often ("off": only at shutdown)'), shownDefault: "30s" },
} as const;

/** Every quota, as a flag: --max-vms-per-tenant etc. */
const LIMIT_OPTIONS = {
  vmsPerTenant: opt("max-vms-per-tenant", positiveInt, DEFAULT_LIMITS.vmsPerTenant, "VMs per tenant"),
  guestMemoryBytesPerVm: opt("max-guest-memory-bytes", positiveInt, DEFAULT_LIMITS.guestMemoryBytesPerVm, "guest_memory_bytes per VM"),
  guestMemoryBytesPerTenant: opt("max-tenant-guest-memory-bytes", positiveInt, DEFAULT_LIMITS.guestMemoryBytesPerTenant, "guest_memory_bytes summed per tenant"),
  touchedBytesPerVm: opt("max-touched-bytes-per-vm", positiveInt, DEFAULT_LIMITS.touchedBytesPerVm, "guest RAM written per VM"),
  touchedBytesPerTenant: opt("max-tenant-touched-bytes", positiveInt, DEFAULT_LIMITS.touchedBytesPerTenant, "guest RAM written per tenant"),
  objectsPerVm: opt("max-objects-per-vm", positiveInt, DEFAULT_LIMITS.objectsPerVm, "objects (IOAS, HWPT, device) per VM"),
  mappedBytesPerIoas: opt("max-mapped-bytes-per-ioas", positiveInt, DEFAULT_LIMITS.mappedBytesPerIoas, "bytes mapped per IOAS"),
  iotlbEntriesPerVm: opt("max-iotlb-entries", positiveInt, DEFAULT_LIMITS.iotlbEntriesPerVm, "VmOptions.iotlb_entries"),
  translateBatch: opt("max-translate-batch", positiveInt, DEFAULT_LIMITS.translateBatch, "IOVAs per Translate"),
  invalidateEntries: opt("max-invalidate-entries", positiveInt, DEFAULT_LIMITS.invalidateEntries, "entries per Invalidate"),
  guestIoBytes: opt("max-guest-io-bytes", positiveInt, DEFAULT_LIMITS.guestIoBytes, "bytes per Write/ReadGuestMemory"),
} as const;

const ALL = { ...OPTIONS, ...LIMIT_OPTIONS };

export const USAGE = [
  "usage: iommufd-service [options]",
  ...Object.values(ALL).map((o) => `  --${`${o.flag} ${o.metavar}`.padEnd(34)} ${o.help} (env ${o.env}${o.fallback === undefined ? "" : `, default ${(o as Option<unknown>).shownDefault ?? o.fallback}`})`),
  `  --${"insecure".padEnd(34)} allow plaintext on a non-loopback address (env IOMMUFD_INSECURE=1)`,
  `  --${"help".padEnd(34)} this text`,
].join("\n");

const LOOPBACK = /^(127\.\d+\.\d+\.\d+|\[::1\]|localhost)$/;

/** Parses argv and env; throws ConfigError on bad input. Returns undefined for --help. */
export function loadConfig(argv: string[], env: NodeJS.ProcessEnv): Config | undefined {
  const { values } = parseArgs({
    args: argv,
    options: {
      ...Object.fromEntries(Object.values(ALL).map((o) => [o.flag, { type: "string" as const }])),
      insecure: { type: "boolean" },
      help: { type: "boolean" },
    },
    strict: true,
  });
  if (values.help) return undefined;
  // A setting comes from its flag, else its env variable; errors name the source.
  const pick = <T>(o: Option<T>): T => {
    const fromFlag = (values as Record<string, string | boolean | undefined>)[o.flag] as string | undefined;
    if (fromFlag !== undefined) return o.parse(fromFlag, `--${o.flag}`);
    const fromEnv = env[o.env];
    return fromEnv === undefined ? o.fallback : o.parse(fromEnv, o.env);
  };
  const get = <K extends keyof typeof OPTIONS>(key: K) => pick(OPTIONS[key] as Option<(typeof OPTIONS)[K]["fallback"]>);

  const certFile = get("tlsCert");
  const keyFile = get("tlsKey");
  const caFile = get("tlsClientCa");
  if ((certFile === undefined) !== (keyFile === undefined)) throw new ConfigError("--tls-cert and --tls-key go together");
  if (caFile !== undefined && certFile === undefined) throw new ConfigError("--tls-client-ca needs --tls-cert and --tls-key");
  const tls = certFile && keyFile ? { cert: pem(certFile, "--tls-cert"), key: pem(keyFile, "--tls-key"), clientCa: caFile ? pem(caFile, "--tls-client-ca") : undefined } : undefined;

  const listen = get("listen");
  const insecure = values.insecure === true || env.IOMMUFD_INSECURE === "1";
  const host = listen.slice(0, listen.lastIndexOf(":"));
  if (tls === undefined && !insecure && !LOOPBACK.test(host)) {
    throw new ConfigError(`refusing to serve plaintext on ${listen}: it is not a loopback address; configure --tls-cert/--tls-key, or pass --insecure`);
  }
  const healthListen = get("healthListen");
  if (healthListen !== "off" && tls?.clientCa === undefined) throw new ConfigError("--health-listen is for probes under mutual TLS (--tls-client-ca)");

  const limits = Object.fromEntries(Object.entries(LIMIT_OPTIONS).map(([key, o]) => [key, pick(o as Option<number>)])) as unknown as Limits;
  return {
    listen,
    metricsListen: get("metricsListen"),
    healthListen,
    logLevel: get("logLevel"),
    maxMessageBytes: get("maxMessageBytes"),
    drainTimeoutMs: get("drainTimeoutMs"),
    metricsVmLabelCap: get("metricsVmLabelCap"),
    tls,
    insecure,
    adminIdentity: get("adminIdentity"),
    stateDir: get("stateDir"),
    snapshotIntervalMs: get("snapshotInterval"),
    limits,
  };
}

/** The configuration with embedded defaults (tests, benchmarks). */
export const DEFAULT_CONFIG: Config = loadConfig([], {})!;
