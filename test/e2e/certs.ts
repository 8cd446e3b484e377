import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, type TestContext } from "vitest";
import { execFileAsync, skipBecause } from "./support.js";

/**
 * Throwaway X.509 material for the TLS tests, generated with `openssl` in a
 * temporary directory at test setup: nothing secret is committed, and every
 * run gets fresh keys.
 */

/** A certificate, its key and where they are on disk (for the process-level tests' flags). */
export interface Credential {
  readonly cert: Buffer;
  readonly key: Buffer;
  readonly certFile: string;
  readonly keyFile: string;
}

/** A CA: its certificate (what a peer trusts) and its key (to issue leaves). */
export interface Authority extends Credential {}

export interface LeafSpec {
  /** Subject CN. */
  readonly cn: string;
  /** subjectAltName entries in openssl syntax: "URI:spiffe://...", "IP:127.0.0.1", "DNS:localhost". */
  readonly san?: readonly string[];
  readonly usage: "serverAuth" | "clientAuth";
}

/** The openssl command line, or why it cannot be used (for skipBecause). */
export async function opensslMissing(): Promise<string | undefined> {
  try {
    await execFileAsync("openssl", ["version"]);
    return undefined;
  } catch (e) {
    const reason = (e as NodeJS.ErrnoException).code === "ENOENT" ? "openssl is not installed" : `openssl does not run (${(e as Error).message})`;
    return `${reason}: apt-get install -y openssl`;
  }
}

/** A temporary directory of generated keys and certificates; remove() deletes it. */
export class Pki {
  private constructor(readonly dir: string) {}

  static async create(): Promise<Pki> {
    return new Pki(await mkdtemp(join(tmpdir(), "iommufd-tls-")));
  }

  /** A self-signed CA (EC P-256, valid for one day). */
  async authority(name: string): Promise<Authority> {
    const certFile = join(this.dir, `${name}.crt`);
    const keyFile = join(this.dir, `${name}.key`);
    await openssl([
      "req", "-x509", "-new", "-nodes",
      "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
      "-keyout", keyFile, "-out", certFile, "-days", "1",
      "-subj", `/CN=${name}`,
      "-addext", "basicConstraints=critical,CA:TRUE",
      "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    return load(certFile, keyFile);
  }

  /** A leaf certificate issued by `ca`. */
  async leaf(ca: Authority, name: string, spec: LeafSpec): Promise<Credential> {
    const certFile = join(this.dir, `${name}.crt`);
    const keyFile = join(this.dir, `${name}.key`);
    const csrFile = join(this.dir, `${name}.csr`);
    const extFile = join(this.dir, `${name}.ext`);
    await openssl([
      "req", "-new", "-nodes",
      "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
      "-keyout", keyFile, "-out", csrFile, "-subj", `/CN=${spec.cn}`,
    ]);
    const extensions = [
      "basicConstraints=critical,CA:FALSE",
      "keyUsage=critical,digitalSignature",
      `extendedKeyUsage=${spec.usage}`,
      ...(spec.san?.length ? [`subjectAltName=${spec.san.join(",")}`] : []),
    ];
    await writeFile(extFile, `${extensions.join("\n")}\n`);
    await openssl([
      "x509", "-req", "-in", csrFile,
      "-CA", ca.certFile, "-CAkey", ca.keyFile, "-set_serial", `0x${randomBytes(8).toString("hex")}`,
      "-days", "1", "-extfile", extFile, "-out", certFile,
    ]);
    return load(certFile, keyFile);
  }

  async remove(): Promise<void> {
    await rm(this.dir, { recursive: true, force: true });
  }
}

async function openssl(args: string[]): Promise<void> {
  try {
    await execFileAsync("openssl", args);
  } catch (e) {
    const { stderr } = e as { stderr?: string };
    throw new Error(`openssl ${args[0]} failed: ${stderr ?? (e as Error).message}`);
  }
}

async function load(certFile: string, keyFile: string): Promise<Credential> {
  return { cert: await readFile(certFile), key: await readFile(keyFile), certFile, keyFile };
}

/** Identities of the test tenants. */
export const TENANT_A = "spiffe://example.org/tenant-a";
export const TENANT_B = "tenant-b";
export const ADMIN = "spiffe://example.org/ops-admin";

/** Everything the TLS tests use: one CA, a server and three clients, plus an impostor from another CA. */
export interface TestPki {
  readonly pki: Pki;
  readonly ca: Authority;
  /** For 127.0.0.1 and localhost. */
  readonly server: Credential;
  /** Tenant A: a SPIFFE URI SAN (its CN differs, so the URI must win). */
  readonly tenantA: Credential;
  /** Tenant B: only a CN. */
  readonly tenantB: Credential;
  /** The --admin-identity. */
  readonly admin: Credential;
  /** Claims tenant A's identity, but is issued by a CA the server does not trust. */
  readonly impostor: Credential;
}

export async function createTestPki(): Promise<TestPki> {
  const pki = await Pki.create();
  try {
    const ca = await pki.authority("iommufd-test-ca");
    const rogue = await pki.authority("rogue-ca");
    const [server, tenantA, tenantB, admin, impostor] = await Promise.all([
      pki.leaf(ca, "server", { cn: "iommufd-service", san: ["IP:127.0.0.1", "DNS:localhost"], usage: "serverAuth" }),
      pki.leaf(ca, "tenant-a", { cn: "alice-orchestrator", san: [`URI:${TENANT_A}`], usage: "clientAuth" }),
      pki.leaf(ca, "tenant-b", { cn: TENANT_B, usage: "clientAuth" }),
      pki.leaf(ca, "admin", { cn: "ops", san: [`URI:${ADMIN}`], usage: "clientAuth" }),
      pki.leaf(rogue, "impostor", { cn: "alice-orchestrator", san: [`URI:${TENANT_A}`], usage: "clientAuth" }),
    ]);
    return { pki, ca, server, tenantA, tenantB, admin, impostor };
  } catch (e) {
    await pki.remove();
    throw e;
  }
}

/**
 * A test file's PKI: created in its beforeAll (unless openssl is missing) and
 * removed in its afterAll. `current` is undefined when it could not be made;
 * `require(ctx)` returns it or skips the test, visibly, with the reason.
 */
export function useTestPki(): { readonly current: TestPki | undefined; require(ctx: TestContext): TestPki } {
  let pki: TestPki | undefined;
  let why = "no test certificates";
  beforeAll(async () => {
    const missing = await opensslMissing();
    if (missing) why = missing;
    else pki = await createTestPki();
  }, 60_000);
  afterAll(async () => {
    await pki?.pki.remove();
  });
  return {
    get current() {
      return pki;
    },
    require: (ctx) => pki ?? skipBecause(ctx, why),
  };
}
