import { type ChildProcessByStdio, spawn } from "node:child_process";
import { join } from "node:path";
import { createInterface } from "node:readline";
import type { Readable } from "node:stream";
import { REPO_ROOT } from "./support.js";

/**
 * The server as `npm start` runs it (tsx server/main.ts, a real process, real
 * signals), for the e2e tests: launched in its own process group, run to its
 * exit, or started on free loopback ports with its pino log lines collected
 * as they come and stopped by signal. killServers() in afterEach.
 */

const TSX = join(REPO_ROOT, "node_modules/.bin/tsx");
const MAIN = join(REPO_ROOT, "server/main.ts");
export const EPHEMERAL = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];

type Child = ChildProcessByStdio<null, Readable, Readable>;

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A pino log line (the fields the tests look at). */
export interface LogLine {
  level?: number;
  msg?: string;
  grpc?: string;
  [field: string]: unknown;
}

export interface ServerProcess {
  /** HOST:PORT of the gRPC listener. */
  readonly target: string;
  /** Every log line so far (the array grows while the process runs). */
  readonly lines: LogLine[];
  readonly exited: Promise<Exit>;
  stderr(): string;
  /** Sends `signal` and resolves with how the process ended. */
  kill(signal: NodeJS.Signals): Promise<Exit>;
}

const children = new Set<Child>();

/** Kills (SIGKILL, whole process group) every server still running: for afterEach. */
export function killServers(): void {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) {
      try {
        process.kill(-child.pid, "SIGKILL");
      } catch {
        // Already gone.
      }
    }
  }
  children.clear();
}

/** Launches the server with `args` (own process group: tsx runs it in a child node, and signals must reach both). */
export function launch(args: string[], env: NodeJS.ProcessEnv = {}): { child: Child; exited: Promise<Exit>; stderr(): string } {
  const child = spawn(TSX, [MAIN, ...args], { cwd: REPO_ROOT, env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"], detached: true });
  children.add(child);
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
  // "close", not "exit": the output is complete only once the pipes close.
  const exited = new Promise<Exit>((resolve) => child.once("close", (code, signal) => resolve({ code, signal })));
  return { child, exited, stderr: () => stderr };
}

/** Runs the server to its exit (bad flags, --help) with its output. */
export async function runToExit(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Exit & { stdout: string; stderr: string }> {
  const { child, exited, stderr } = launch(args, env);
  let stdout = "";
  child.stdout.setEncoding("utf8").on("data", (chunk: string) => (stdout += chunk));
  const exit = await exited;
  return { ...exit, stdout, stderr: stderr() };
}

/** Starts the server with `args` and waits for the log line that names the bound addresses. */
export async function startServerProcess(args: string[], env: NodeJS.ProcessEnv = {}): Promise<ServerProcess> {
  const { child, exited, stderr } = launch(args, env);
  const lines: LogLine[] = [];
  const listening = await new Promise<LogLine>((resolve, reject) => {
    createInterface({ input: child.stdout }).on("line", (text) => {
      let line: LogLine;
      try {
        line = JSON.parse(text) as LogLine;
      } catch {
        return;
      }
      lines.push(line);
      if (typeof line.grpc === "string") resolve(line);
    });
    void exited.then((exit) => reject(new Error(`server exited (${exit.code ?? exit.signal}) before listening:\n${stderr()}`)));
  });
  const grpcAddress = listening.grpc!;
  return {
    target: `127.0.0.1:${grpcAddress.slice(grpcAddress.lastIndexOf(":") + 1)}`,
    lines,
    exited,
    stderr,
    async kill(signal) {
      // SIGKILL takes the whole group down (a crash); other signals go to tsx,
      // which relays them once to the server (a second SIGTERM would kill it).
      if (signal === "SIGKILL") process.kill(-child.pid!, signal);
      else child.kill(signal);
      return exited;
    },
  };
}
