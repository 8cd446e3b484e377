#!/usr/bin/env -S npx tsx
import { type DescField, type DescMessage, fromJson, type JsonValue, toJsonString } from "@bufbuild/protobuf";
import { createReadStream, createWriteStream } from "node:fs";
import { pipeline } from "node:stream/promises";
import { parseArgs } from "node:util";
import { IommufdService } from "../gen/iommufd/v1/service_pb.js";
import { VmSchema } from "../gen/iommufd/v1/vm_pb.js";
import { IommufdClient, IommufdError } from "./client.js";

/**
 * iommufdctl: one subcommand per RPC (kebab-case: create-vm, map-ioas, ...),
 * flags named after the request fields (--vm-id, --guest-memory-bytes, ...)
 * or a whole request as --json, output as JSON.
 */

const kebab = (s: string): string => s.replace(/([a-z0-9])([A-Z])/g, "$1-$2").replace(/_/g, "-").toLowerCase();

const methods = new Map(IommufdService.methods.map((m) => [kebab(m.name), m]));

/** The streaming RPCs move a snapshot between the server and a file (default stdout/stdin). */
const SNAPSHOT_FLAGS: Record<string, string> = {
  "export-vm": "--vm-id [--file PATH]",
  "import-vm": "[--vm-id NEW_ID] [--file PATH]",
};

async function snapshotCommand(client: IommufdClient, command: string, args: string[], deadline: number): Promise<string> {
  const { values } = parseArgs({ args, options: { "vm-id": { type: "string" }, file: { type: "string" } }, strict: true });
  const vmId = values["vm-id"] ?? "";
  if (command === "export-vm") {
    const out = values.file === undefined ? process.stdout : createWriteStream(values.file);
    await pipeline(client.exportVmChunks({ vmId }, { deadline }), out);
    return values.file === undefined ? "" : JSON.stringify({ vmId, file: values.file });
  }
  const source = values.file === undefined ? process.stdin : createReadStream(values.file);
  const { vm } = await client.importVm({ vmId, snapshot: source }, { deadline });
  return toJsonString(VmSchema, vm!, { prettySpaces: 2 });
}

function usage(): string {
  const lines = [
    "usage: iommufdctl [--target HOST:PORT] [--timeout-ms N] <command> [--field value ...] [--json '{...}']",
    "",
    "  --target      server address (env IOMMUFD_TARGET, default 127.0.0.1:50051)",
    "  --json        the whole request as protobuf JSON; field flags override it",
    "  enum values may be given without their prefix (--model MOCK); 64-bit numbers as decimal or 0x hex;",
    "  message, repeated and oneof fields take JSON (--ranges '[{\"start\":\"4096\",\"last\":\"8191\"}]').",
    "",
    "commands:",
  ];
  for (const [name, m] of methods) {
    const flags = name in SNAPSHOT_FLAGS ? SNAPSHOT_FLAGS[name] : m.input.fields.map((f) => `--${kebab(f.name)}`).join(" ");
    lines.push(`  ${name.padEnd(20)} ${flags}`);
  }
  return lines.join("\n");
}

/** One flag's text as the protobuf JSON value of field `f`. */
function jsonValue(f: DescField, text: string | boolean): JsonValue {
  if (typeof text === "boolean") return text;
  switch (f.fieldKind) {
    case "scalar": {
      // Scalars by protobuf type: strings stay text, bools parse, numbers
      // go through BigInt so that 0x-prefixed and 64-bit values work.
      const t = f.scalar;
      if (t === 9 /* STRING */) return text;
      if (t === 12 /* BYTES */) return text;
      if (t === 8 /* BOOL */) return text === "true";
      return BigInt(text).toString();
    }
    case "enum": {
      const upper = text.toUpperCase();
      const value = f.enum.values.find((v) => v.name === upper || v.name.endsWith(`_${upper}`));
      return value?.name ?? text;
    }
    default:
      return JSON.parse(text) as JsonValue;
  }
}

function buildRequest(schema: DescMessage, args: string[]): unknown {
  const options: Record<string, { type: "string" | "boolean" }> = { json: { type: "string" } };
  for (const f of schema.fields) options[kebab(f.name)] = { type: f.fieldKind === "scalar" && f.scalar === 8 ? "boolean" : "string" };
  const { values } = parseArgs({ args, options, strict: true });
  const json: Record<string, JsonValue> = values.json ? (JSON.parse(values.json as string) as Record<string, JsonValue>) : {};
  for (const f of schema.fields) {
    const v = values[kebab(f.name)];
    if (v !== undefined) json[f.jsonName] = jsonValue(f, v as string | boolean);
  }
  return fromJson(schema, json);
}

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: { target: { type: "string" }, "timeout-ms": { type: "string" }, help: { type: "boolean" } },
    allowPositionals: true,
    strict: false,
  });
  const command = positionals[0];
  if (values.help || command === undefined || command === "help") {
    process.stdout.write(`${usage()}\n`);
    return command === undefined && !values.help ? 2 : 0;
  }
  const method = methods.get(command);
  if (method === undefined) {
    process.stderr.write(`iommufdctl: unknown command "${command}"\n${usage()}\n`);
    return 2;
  }
  const rest = argv.slice(argv.indexOf(command) + 1);
  let request: unknown;
  try {
    if (!(command in SNAPSHOT_FLAGS)) request = buildRequest(method.input, rest);
  } catch (e) {
    process.stderr.write(`iommufdctl ${command}: ${(e as Error).message}\n`);
    return 2;
  }
  const target = (values.target as string | undefined) ?? process.env.IOMMUFD_TARGET ?? "127.0.0.1:50051";
  const client = new IommufdClient(target);
  const deadline = Date.now() + Number((values["timeout-ms"] as string | undefined) ?? 10_000);
  try {
    if (command in SNAPSHOT_FLAGS) {
      const out = await snapshotCommand(client, command, rest, deadline);
      if (out) process.stdout.write(`${out}\n`);
      return 0;
    }
    const call = (client as unknown as Record<string, (r: unknown, o: object) => Promise<never>>)[method.localName];
    const response = await call(request, { deadline });
    process.stdout.write(`${toJsonString(method.output, response, { prettySpaces: 2 })}\n`);
    return 0;
  } catch (e) {
    if (!(e instanceof IommufdError)) {
      // A bad flag or an unreadable file of export-vm/import-vm.
      process.stderr.write(`iommufdctl ${command}: ${(e as Error).message}\n`);
      return (e as { code?: string }).code?.startsWith("ERR_PARSE_ARGS") ? 2 : 1;
    }
    const out = { code: e.code, errno: e.errno, errnoValue: e.errnoValue, entriesHandled: e.entriesHandled, message: e.message };
    process.stderr.write(`${JSON.stringify(out, null, 2)}\n`);
    return 1;
  } finally {
    client.close();
  }
}

process.exitCode = await main(process.argv.slice(2));
