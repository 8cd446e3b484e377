import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

/**
 * Plumbing of the gRPC benchmarks: iommufd-service child processes, h2load
 * runs with pre-framed gRPC bodies, and /metrics scrapes.
 */

const REPO_ROOT = fileURLToPath(new URL("../", import.meta.url));

export const H2LOAD_INSTALL = "apt-get install -y nghttp2-client";

/** The h2load binary, or undefined when it is not installed. */
export function findH2load(): string | undefined {
  const r = spawnSync("h2load", ["--version"], { encoding: "utf8" });
  return r.status === 0 ? "h2load" : undefined;
}

// Every child (servers, h2load) still running, and every scratch directory not
// yet removed: killed and removed on any exit of the bench.
const live = new Set<ChildProcess>();
const scratchDirs = new Set<string>();
function track(child: ChildProcess): void {
  installExitHook();
  live.add(child);
  child.once("exit", () => live.delete(child));
}
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const child of live) child.kill("SIGKILL");
    for (const dir of scratchDirs) rmSync(dir, { recursive: true, force: true });
  });
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    process.once(signal, () => {
      // Kill, then reap (briefly) so no zombie outlives the bench.
      const exits = [...live].map((child) => new Promise((resolve) => child.once("exit", resolve)));
      for (const child of live) child.kill("SIGKILL");
      const timer = setTimeout(() => process.exit(130), 1000);
      void Promise.all(exits).then(() => {
        clearTimeout(timer);
        process.exit(130);
      });
    });
  }
}

export interface ServerProcess {
  readonly pid: number;
  /** HOST:PORT of gRPC. */
  readonly grpc: string;
  /** HOST:PORT of /metrics, "" when metrics are off. */
  readonly metrics: string;
  /** SIGTERM (graceful drain, which also writes a --cpu-prof profile), SIGKILL after 10 s. */
  stop(): Promise<void>;
}

export interface ServerOptions {
  metrics: boolean;
  /** Write a V8 CPU profile of the server into this directory (node --cpu-prof). */
  cpuProfDir?: string;
}

/**
 * Starts `node --import tsx server/main.ts` (one process; the tsx CLI would
 * add a parent process) on free ports and resolves with its bound addresses
 * from the "listening" log line.
 */
export function startServerProcess(options: ServerOptions): Promise<ServerProcess> {
  const nodeArgs = options.cpuProfDir ? ["--cpu-prof", `--cpu-prof-dir=${options.cpuProfDir}`] : [];
  const args = [...nodeArgs, "--import", "tsx", "server/main.ts", "--listen", "127.0.0.1:0", "--metrics-listen", options.metrics ? "127.0.0.1:0" : "off", "--log-level", "info"];
  const child = spawn(process.execPath, args, { cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"] });
  track(child);
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  let stderr = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => {
    stderr = (stderr + d).slice(-4000);
  });

  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(timer);
  };

  return new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => {
      void stop();
      reject(new Error(`server did not log its addresses within 20 s; stderr: ${stderr}`));
    }, 20_000);
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`server exited (${code ?? signal}) before listening; stderr: ${stderr}`));
    });
    // After start-up: keep draining the log, and show the server's errors (pino level >= 50).
    let rest = "";
    const reportErrors = (d: string) => {
      const lines = (rest + d).split("\n");
      rest = lines.pop()!;
      for (const line of lines) {
        if (/"level":(5|6)\d/.test(line)) console.error(`server ${child.pid}: ${line}`);
      }
    };
    const onData = (d: string) => {
      out += d;
      let nl: number;
      while ((nl = out.indexOf("\n")) >= 0) {
        const line = out.slice(0, nl);
        out = out.slice(nl + 1);
        try {
          const rec = JSON.parse(line) as { grpc?: string; metrics?: string };
          if (typeof rec.grpc === "string") {
            clearTimeout(timer);
            child.stdout!.off("data", onData);
            child.stdout!.on("data", reportErrors);
            resolve({ pid: child.pid!, grpc: rec.grpc, metrics: rec.metrics ?? "", stop });
            return;
          }
        } catch {
          // not a JSON log line
        }
      }
    };
    child.stdout!.setEncoding("utf8").on("data", onData);
  });
}

/** Runs fn with a started server and always stops it (also when fn throws). */
export async function withServers<T>(options: ServerOptions[], fn: (servers: ServerProcess[]) => Promise<T>): Promise<T> {
  const started = await Promise.allSettled(options.map(startServerProcess));
  const servers = started.flatMap((s) => (s.status === "fulfilled" ? [s.value] : []));
  try {
    const failed = started.find((s) => s.status === "rejected");
    if (failed) throw (failed as PromiseRejectedResult).reason;
    return await fn(servers);
  } finally {
    await Promise.all(servers.map((s) => s.stop()));
  }
}

/** A message framed for gRPC: uncompressed flag, big-endian length, the protobuf bytes. */
export function grpcFrame(message: Uint8Array): Buffer {
  const framed = Buffer.alloc(5 + message.length);
  framed.writeUInt32BE(message.length, 1);
  framed.set(message, 5);
  return framed;
}

/** A temporary directory for request bodies and profiles, removed by cleanup(). */
export function scratchDir(): { dir: string; file(name: string, data: Uint8Array): string; cleanup(): void } {
  installExitHook();
  const dir = mkdtempSync(join(tmpdir(), "iommufd-bench-"));
  scratchDirs.add(dir);
  return {
    dir,
    file(name, data) {
      const path = join(dir, name);
      writeFileSync(path, data);
      return path;
    },
    cleanup: () => {
      rmSync(dir, { recursive: true, force: true });
      scratchDirs.delete(dir);
    },
  };
}

export interface H2loadSettings {
  /** -c: connections. */
  connections: number;
  /** -m: concurrent streams per connection. */
  streams: number;
  /** -t: h2load threads. */
  threads: number;
}

export const describeSettings = (s: H2loadSettings, seconds: number): string => `h2load -c ${s.connections} -m ${s.streams} -t ${s.threads} -D ${seconds}`;

export interface H2loadRun {
  /** Wall time h2load measured ("finished in"), seconds. */
  seconds: number;
  /** h2load's own rate (HTTP responses, whatever the grpc-status). */
  reqPerSec: number;
  succeeded: number;
  failed: number;
  errored: number;
}

/** h2load POSTing the pre-framed body in `bodyFile` to `url` for `seconds`. */
export function h2load(url: string, bodyFile: string, s: H2loadSettings, seconds: number): Promise<H2loadRun> {
  const args = [
    "-c", String(s.connections),
    "-m", String(s.streams),
    "-t", String(s.threads),
    "-D", `${Math.round(seconds * 1000)}ms`,
    "-d", bodyFile,
    "-H", "content-type: application/grpc",
    "-H", "te: trailers",
    url,
  ];
  return new Promise((resolve, reject) => {
    const child = spawn("h2load", args, { stdio: ["ignore", "pipe", "pipe"] });
    track(child);
    let out = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (out += d));
    child.once("error", reject);
    child.once("exit", (code) => {
      const finished = /finished in ([\d.]+)(m?s), ([\d.]+) req\/s/.exec(out);
      const requests = /requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored/.exec(out);
      if (code !== 0 || !finished || !requests) {
        reject(new Error(`h2load ${args.join(" ")} exited ${code}:\n${out.slice(-2000)}`));
        return;
      }
      resolve({
        seconds: Number(finished[1]) / (finished[2] === "ms" ? 1000 : 1),
        reqPerSec: Number(finished[3]),
        succeeded: Number(requests[1]),
        failed: Number(requests[2]),
        errored: Number(requests[3]),
      });
    });
  });
}

/** grpc_server_handled_total per grpc_code for one method, from a /metrics scrape. */
export async function handledByCode(metricsAddress: string, service: string, method: string): Promise<Map<string, number>> {
  const res = await fetch(`http://${metricsAddress}/metrics`);
  if (!res.ok) throw new Error(`GET /metrics: HTTP ${res.status}`);
  const text = await res.text();
  const codes = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (!line.startsWith("grpc_server_handled_total{")) continue;
    const close = line.lastIndexOf("}");
    const labels = Object.fromEntries([...line.slice(0, close).matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]));
    if (labels.grpc_service !== service || labels.grpc_method !== method) continue;
    codes.set(labels.grpc_code, Number(line.slice(close + 1).trim()));
  }
  return codes;
}
