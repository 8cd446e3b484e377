import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

/**
 * One iommufd-service child process for the memory-oriented benchmarks
 * (bench/soak.ts, bench/scale-vms.ts): any extra server flags (raised
 * limits), its RSS from /proc/<pid>/status (the server alone, not this
 * client), and /metrics scrapes. bench/grpc-support.ts starts servers for
 * the throughput scenarios; this one differs in taking arbitrary flags and
 * in reading the child's memory.
 */

const REPO_ROOT = fileURLToPath(new URL("../", import.meta.url));

export const MIB = 2 ** 20;

export interface ServerChild {
  readonly pid: number;
  /** gRPC HOST:PORT. */
  readonly grpc: string;
  /** /metrics HOST:PORT. */
  readonly metrics: string;
  /** Server log lines at level error or fatal seen so far. */
  readonly errorLines: string[];
  /** SIGTERM (graceful drain), SIGKILL after 15 s; resolves with the exit code or signal. */
  stop(): Promise<number | string | null>;
  /** True once the process has exited. */
  exited(): boolean;
}

export interface ServerChildOptions {
  /** Server flags beyond --listen/--metrics-listen/--log-level. */
  args?: string[];
  /** Node flags (e.g. --cpu-prof, --heapsnapshot-signal=SIGUSR2). */
  nodeArgs?: string[];
  /** Extra environment variables (e.g. glibc malloc tunables). */
  env?: Record<string, string>;
}

const live = new Set<ChildProcess>();
let hooked = false;
function track(child: ChildProcess): void {
  if (!hooked) {
    hooked = true;
    process.on("exit", () => {
      for (const c of live) c.kill("SIGKILL");
    });
    for (const signal of ["SIGINT", "SIGTERM"] as const) {
      process.once(signal, () => {
        for (const c of live) c.kill("SIGKILL");
        process.exit(130);
      });
    }
  }
  live.add(child);
  child.once("exit", () => live.delete(child));
}

/**
 * Starts `node --import tsx server/main.ts` (one process, so its pid is the
 * server's) on free loopback ports; resolves once it logged its addresses.
 */
export function startServerChild(options: ServerChildOptions = {}): Promise<ServerChild> {
  const args = [
    ...(options.nodeArgs ?? []),
    "--import",
    "tsx",
    "server/main.ts",
    "--listen",
    "127.0.0.1:0",
    "--metrics-listen",
    "127.0.0.1:0",
    "--log-level",
    "info",
    ...(options.args ?? []),
  ];
  const child = spawn(process.execPath, args, { cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...options.env } });
  track(child);
  const exit = new Promise<number | string | null>((resolve) => child.once("exit", (code, signal) => resolve(code ?? signal)));
  let stderr = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => {
    stderr = (stderr + d).slice(-4000);
    process.stderr.write(`server ${child.pid} stderr: ${d}`);
  });
  const errorLines: string[] = [];
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 15_000);
      const code = await exit;
      clearTimeout(timer);
      return code;
    }
    return child.exitCode ?? child.signalCode;
  };

  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      void stop();
      reject(new Error(`server did not log its addresses within 30 s; stderr: ${stderr}`));
    }, 30_000);
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`server exited (${code ?? signal}) before listening; stderr: ${stderr}`));
    });
    let pending = "";
    let started = false;
    child.stdout!.setEncoding("utf8").on("data", (d: string) => {
      const lines = (pending + d).split("\n");
      pending = lines.pop()!;
      for (const line of lines) {
        if (/"level":(5|6)\d/.test(line)) {
          errorLines.push(line);
          console.error(`server ${child.pid}: ${line}`);
        }
        if (started) continue;
        try {
          const rec = JSON.parse(line) as { grpc?: string; metrics?: string };
          if (typeof rec.grpc === "string") {
            started = true;
            clearTimeout(timer);
            resolve({ pid: child.pid!, grpc: rec.grpc, metrics: rec.metrics ?? "", errorLines, stop, exited: () => child.exitCode !== null || child.signalCode !== null });
          }
        } catch {
          // not a JSON log line
        }
      }
    });
  });
}

/** VmRSS of `pid` in bytes (/proc/<pid>/status). */
export function rssBytes(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const m = /^VmRSS:\s+(\d+) kB/m.exec(status);
  if (!m) throw new Error(`no VmRSS in /proc/${pid}/status`);
  return Number(m[1]) * 1024;
}

/** CPU seconds (user + system) `pid` has used (/proc/<pid>/stat). */
export function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // Fields 14 and 15 (utime, stime) are at 11 and 12 after the comm field.
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

export interface Scrape {
  ms: number;
  bytes: number;
  text: string;
}

/** GET /metrics, timed from request to the last byte. */
export async function scrapeMetrics(address: string): Promise<Scrape> {
  const t0 = performance.now();
  const res = await fetch(`http://${address}/metrics`);
  const text = await res.text();
  const ms = performance.now() - t0;
  if (!res.ok) throw new Error(`GET /metrics: HTTP ${res.status}`);
  return { ms, bytes: Buffer.byteLength(text), text };
}

/** The unlabelled (or first) sample of `name` in a scrape, or undefined. */
export function sampleValue(text: string, name: string): number | undefined {
  const m = new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)`, "m").exec(text);
  return m ? Number(m[1]) : undefined;
}

/** Sum of every sample of `name` whose labels contain all of `labels` (k="v" pairs). */
export function sampleSum(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (!want.every((w) => line.includes(w))) continue;
    sum += Number(line.slice(line.lastIndexOf(" ") + 1));
  }
  return sum;
}

/** Number of sample lines (not comments) in a scrape. */
export function seriesCount(text: string): number {
  let n = 0;
  for (const line of text.split("\n")) if (line !== "" && !line.startsWith("#")) n++;
  return n;
}

/**
 * Where a process's RSS is, from /proc/<pid>/smaps, in bytes: the malloc
 * main arena ([heap], brk), other anonymous mappings (V8's heap pages,
 * mmapped malloc chunks and thread arenas), and file-backed mappings (code).
 */
export function rssBreakdown(pid: number): { brkHeap: number; anonymous: number; files: number; other: number } {
  const out = { brkHeap: 0, anonymous: 0, files: 0, other: 0 };
  let bucket: keyof typeof out = "other";
  for (const line of readFileSync(`/proc/${pid}/smaps`, "utf8").split("\n")) {
    const header = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (header) {
      const name = header[1];
      bucket = name === "[heap]" ? "brkHeap" : name === "" ? "anonymous" : name.startsWith("/") ? "files" : "other";
      continue;
    }
    const rss = /^Rss:\s+(\d+) kB/.exec(line);
    if (rss) out[bucket] += Number(rss[1]) * 1024;
  }
  return out;
}
