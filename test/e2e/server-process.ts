import { type ChildProcessByStdio, spawn } from "node:child_process";
import { join } from "node:path";
import { createInterface } from "node:readline";
import type { Readable } from "node:stream";
import { REPO_ROOT } from "./support.js";

/**
 * The server as `npm start` runs it (tsx server/main.ts, a real process, real
 * signals), for the snapshot e2e tests: started on free loopback ports, its
 * pino log lines collected as they come, stopped by signal.
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

/** Starts the server with `args` and waits for the log line that names the bound addresses. */
export async function startServerProcess(args: string[], env: NodeJS.ProcessEnv = {}): Promise<ServerProcess> {
  // Own process group: tsx runs the server in a child node process, and a
  // signal must reach that one.
  const child = spawn(TSX, [MAIN, ...args], { cwd: REPO_ROOT, env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"], detached: true });
  children.add(child);
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
  // "close", not "exit": the output is complete only once the pipes close.
  const exited = new Promise<Exit>((resolve) => child.once("close", (code, signal) => resolve({ code, signal })));
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
    void exited.then((exit) => reject(new Error(`server exited (${exit.code ?? exit.signal}) before listening:\n${stderr}`)));
  });
  const grpcAddress = listening.grpc!;
  return {
    target: `127.0.0.1:${grpcAddress.slice(grpcAddress.lastIndexOf(":") + 1)}`,
    lines,
    exited,
    stderr: () => stderr,
    async kill(signal) {
      // SIGKILL takes the whole group down (a crash); other signals go to tsx,
      // which relays them once to the server (a second SIGTERM would kill it).
      if (signal === "SIGKILL") process.kill(-child.pid!, signal);
      else child.kill(signal);
      return exited;
    },
  };
}
