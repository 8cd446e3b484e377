import type { PeerCertificate } from "node:tls";
import { fail } from "../core/errno.js";

/** Who a call acts for. */
export interface CallContext {
  /** The tenant: the client certificate's identity, "" without mutual TLS. */
  readonly tenant: string;
  /** The configured admin identity: ListVms shows every tenant's VMs. */
  readonly admin: boolean;
}

export interface IdentityOptions {
  /** Client certificates are required (--tls-client-ca): they name the tenant. */
  readonly mutualTls: boolean;
  readonly adminIdentity: string | undefined;
}

const IMPLICIT: CallContext = { tenant: "", admin: false };

/**
 * The tenant of a call: with mutual TLS, the client certificate's first URI
 * subjectAltName (e.g. a SPIFFE ID), else its subject CN. Without it, every
 * caller is the one implicit tenant.
 */
export function callIdentity(call: { getAuthContext(): { sslPeerCertificate?: PeerCertificate } }, options: IdentityOptions): CallContext {
  if (!options.mutualTls) return IMPLICIT;
  const cert = call.getAuthContext().sslPeerCertificate;
  const uri = cert?.subjectaltname
    ?.split(/,\s*/)
    .find((name: string) => name.startsWith("URI:"))
    ?.slice(4);
  const cn = cert?.subject?.CN;
  const tenant = uri ?? (Array.isArray(cn) ? cn[0] : cn);
  if (!tenant) fail("EPERM", "the client certificate names no identity (no URI subjectAltName, no CN)");
  return { tenant, admin: tenant === options.adminIdentity };
}
