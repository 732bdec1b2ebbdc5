/**
 * The config file (`tether.json`, or `--config FILE`): one file for the server, the simulated devices and the apps.
 * Every key is optional and has a documented default; unknown keys and wrong
 * types are errors that say what to change.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { TetherError } from './errors';
import { shown } from './util';
import type { Level } from './log';
import { AuthOptions, hashProblem } from './auth';
import type { BridgeOptions } from './bridge';
import { APP_RESTART_DEFAULTS, AppRestartOptions } from './apps';
import { ENDPOINT_DEFAULTS } from './endpoint';
import { FLEET_DEFAULTS } from './fleet';
import { HTTP_OPTION_CHECKS, httpLimitsProblem } from './http';
import type { HttpLimitOptions } from './http';
import { SERVER_DEFAULTS } from './server';
import type { DuplicateIdPolicy } from './server';
import type { TlsOptions } from './transports/tcp';
import type { MeshOptions } from './transports/uart';

export interface AppSpec {
  /** Path of the app script, relative to the config file. */
  script: string;
  /** Client IDs to run it for; `"*"` runs it for every ID that connects. Default: the script's own `clients` export, else `"*"`. */
  clients?: string[] | '*';
  /** Run it for every device of this type instead. */
  type?: string;
}

/** The `mesh` section: the UART transport's options, with `dataTypes` as a path relative to the config file. */
export type MeshConfig = Omit<MeshOptions, 'dataTypes'> & { dataTypes?: string };

export interface TetherConfig {
  /** Address the server listens on. */
  host: string;
  /** Address devices (and `tether sim`) connect to. */
  server: string;
  port: number;
  timeout: number;
  settleDelay: number;
  maxLineLength: number;
  maxIdLength: number;
  idTimeout: number;
  rxBuffer: number;
  rxHold: number;
  rxBufferBytes: number;
  stallAfter: number;
  maxQueuedWrites: number;
  window: number;
  /** ID lines may declare a type and metadata (`id##type##{json}`); off: `##` is part of the ID, as with the original. */
  idLineTypes: boolean;
  /** How failed app instances are restarted. */
  appRestart: AppRestartOptions;
  maxConnections: number;
  maxConnectionsPerAddress: number;
  maxSendBuffer: number;
  maxDevices: number;
  maxBufferedBytes: number;
  /** Per-device sends the fleet (HTTP API, apps' fleet.send) holds waiting for devices; more get ERR_BUSY / 503. */
  maxPendingSends: number;
  /** Bytes of line text those sends hold, counted per device. */
  maxPendingBytes: number;
  maxStrikes: number;
  strikeWindow: number;
  blockFor: number;
  /** TLS for device links (file paths relative to the config file); null = plain TCP. */
  tls: TlsOptions | null;
  /** Device authentication; null = off (any ID may connect). */
  auth: AuthOptions | null;
  /** MQTT bridge to a broker (docs/scale-out.md); null = off. TLS paths relative to the config file. */
  mqtt: Omit<BridgeOptions, 'logger'> | null;
  /** Device IDs the apps expect (used by `waitAll` and by the simulator). */
  clients: string[];
  allow: string[] | null;
  duplicateId: DuplicateIdPolicy;
  apps: AppSpec[];
  /** Device types: type name → client IDs or glob patterns. */
  types: Record<string, string[]>;
  /** UART transport to an ESP mesh root; null = none. */
  mesh: MeshConfig | null;
  /** Journal folder (relative to the config file) or { dir, fsync }; null = no persistence. */
  persist: string | { dir: string; fsync?: boolean; compactEvery?: number; compactBytes?: number; maxOpenFiles?: number } | null;
  log: { level: Level; format: 'pretty' | 'json' };
  /** The HTTP API, WebSocket feed, metrics and dashboard (`serve` and `demo`); null = off. */
  http: HttpConfig | null;
  /** Folder the config was read from; app scripts resolve against it. */
  baseDir: string;
}

/** The `http` section (with the limits of src/http.ts: allowedHosts, maxConnections, … each optional). */
export interface HttpConfig extends Partial<HttpLimitOptions> {
  /** Address to listen on; `127.0.0.1` keeps it to this machine. */
  host: string;
  /** TCP port; 0 = any free port. */
  port: number;
  /** If set, every POST needs `Authorization: Bearer <token>`; GETs and the WebSocket stay open. */
  token: string | null;
  /** HTTPS with this key and certificate (paths relative to the config file); null = plain HTTP. */
  tls: { key: string; cert: string } | null;
}

export const HTTP_CONFIG_DEFAULTS: HttpConfig = { host: '127.0.0.1', port: 8124, token: null, tls: null };

export const CONFIG_DEFAULTS: Omit<TetherConfig, 'baseDir' | 'idTimeout' | 'stallAfter'> & { idTimeout: number | null; stallAfter: number | null } = {
  host: '0.0.0.0',
  server: '127.0.0.1',
  port: 8123,
  timeout: 2000,
  settleDelay: 200,
  maxLineLength: 65536,
  maxIdLength: 1024,
  idTimeout: null, // = timeout
  rxBuffer: ENDPOINT_DEFAULTS.rxBuffer,
  rxHold: ENDPOINT_DEFAULTS.rxHold,
  rxBufferBytes: ENDPOINT_DEFAULTS.rxBufferBytes,
  stallAfter: null, // = timeout
  maxQueuedWrites: 64,
  window: 8,
  idLineTypes: SERVER_DEFAULTS.idLineTypes,
  appRestart: { ...APP_RESTART_DEFAULTS },
  // The server's own defaults for its limits, so the two cannot drift apart.
  maxConnections: SERVER_DEFAULTS.maxConnections,
  maxConnectionsPerAddress: SERVER_DEFAULTS.maxConnectionsPerAddress,
  maxSendBuffer: SERVER_DEFAULTS.maxSendBuffer,
  maxDevices: SERVER_DEFAULTS.maxDevices,
  maxBufferedBytes: SERVER_DEFAULTS.maxBufferedBytes,
  maxPendingSends: FLEET_DEFAULTS.maxPendingSends,
  maxPendingBytes: FLEET_DEFAULTS.maxPendingBytes,
  maxStrikes: SERVER_DEFAULTS.maxStrikes,
  strikeWindow: SERVER_DEFAULTS.strikeWindow,
  blockFor: SERVER_DEFAULTS.blockFor,
  tls: null,
  auth: null,
  mqtt: null,
  clients: [],
  allow: null,
  duplicateId: 'ignore-new',
  apps: [],
  types: {},
  mesh: null,
  persist: null,
  log: { level: 'info', format: 'pretty' },
  http: HTTP_CONFIG_DEFAULTS,
};

const MESH_CHECKS: Record<string, Check> = {
  path: (v) => (typeof v === 'string' && v.length > 0 ? null : 'the serial device path, e.g. "/dev/ttyUSB0"'),
  baudRate: (v) => int(50, 4_000_000)(v),
  dataBits: (v) => ([5, 6, 7, 8].includes(v as number) ? null : '5, 6, 7 or 8'),
  stopBits: (v) => ([1, 1.5, 2].includes(v as number) ? null : '1, 1.5 or 2'),
  parity: (v) => oneOf('none', 'even', 'odd', 'mark', 'space')(v),
  rtscts: (v) => (typeof v === 'boolean' ? null : 'true or false'),
  maxFrame: (v) => int(16, 1 << 20)(v),
  send: (v) => oneOf('SEND-', 'SENDI')(v),
  commandTimeout: (v) => int(10, 600_000)(v),
  maxOutstanding: (v) => int(1, 100_000)(v),
  reopenMin: (v) => int(10, 600_000)(v),
  reopenMax: (v) => int(10, 3_600_000)(v),
  quarantine: (v) => int(0, 3_600_000)(v),
  dataTypes: (v) => (typeof v === 'string' ? null : 'a path to a data-type table JSON file'),
};

type Check = (v: unknown) => string | null;
/** A table's own entry for `key`: never something inherited like `__proto__` or `constructor`. */
const own = (table: Record<string, Check>, key: string): Check | undefined => (Object.hasOwn(table, key) ? table[key] : undefined);
const int =
  (min: number, max: number): Check =>
  (v) =>
    Number.isInteger(v) && (v as number) >= min && (v as number) <= max ? null : `an integer from ${min} to ${max}`;
const str: Check = (v) => (typeof v === 'string' && v.length > 0 ? null : 'a non-empty string');
const ids: Check = (v) =>
  Array.isArray(v) && v.every((x) => typeof x === 'string' && x.length > 0 && !x.includes('\n'))
    ? null
    : 'a list of client IDs (non-empty strings without "\\n")';
const oneOf =
  (...opts: string[]): Check =>
  (v) =>
    opts.includes(v as string) ? null : `one of ${opts.map((o) => JSON.stringify(o)).join(', ')}`;

const file: Check = (v) => (typeof v === 'string' && v.length > 0 ? null : 'a file path (relative to the config file)');
const TLS_CHECKS: Record<string, Check> = {
  key: file,
  cert: file,
  ca: file,
  clientCerts: oneOf('off', 'optional', 'required'),
  certIds: (v) =>
    v && typeof v === 'object' && !Array.isArray(v) && Object.values(v).every((x) => typeof x === 'string' && x.length > 0)
      ? null
      : '{ "certificate CN": "client ID", … }',
  port: int(0, 65535),
};
const AUTH_CHECKS: Record<string, Check> = {
  devices: (v) => {
    if (!v || typeof v !== 'object' || Array.isArray(v)) return '{ "client ID": "hash from `tether secret <id>`", … }';
    for (const [id, h] of Object.entries(v)) {
      const p = hashProblem(h);
      if (p) return `{ "client ID": hash } where the hash of ${JSON.stringify(id)} is ${p}`;
    }
    return null;
  },
  required: (v) => (typeof v === 'boolean' ? null : 'true or false'),
  maxFailures: int(1, 1_000_000),
  failureWindow: int(1, 86_400_000),
  blockFor: int(0, 86_400_000),
};

const MQTT_CHECKS: Record<string, Check> = {
  url: (v) => (typeof v === 'string' && /^(mqtts?|wss?|tcp|ssl):\/\/./.test(v) ? null : 'a broker URL like "mqtt://127.0.0.1:1883" or "mqtts://broker:8883"'),
  username: str,
  password: str,
  tls: (v) => section({ ca: file, cert: file, key: file }, '{ "ca": "ca.crt" }')(v),
  prefix: (v) => (typeof v === 'string' && v.length > 0 && !/[#+]/.test(v) && !v.endsWith('/') ? null : 'a topic prefix without "#", "+" or a trailing "/", e.g. "tether" or "site-1/tether"'),
  qos: (v) => (v === 1 || v === 2 ? null : '1 or 2'),
  gateway: (v) => (typeof v === 'string' && v.length > 0 && !/[#+/]/.test(v) ? null : 'a gateway name without "/", "#" or "+"'),
  maxQueue: int(1, 10_000_000),
  telemetry: (v) => (typeof v === 'boolean' ? null : 'true or false'),
};

/** Checks an object section key by key against `checks`. */
const section =
  (checks: Record<string, Check>, example: string, required: string[] = []): Check =>
  (v) => {
    if (v === null) return null;
    if (!v || typeof v !== 'object' || Array.isArray(v)) return `null (off) or ${example}`;
    for (const k of required) if ((v as Record<string, unknown>)[k] === undefined) return `an object with "${k}", like ${example}`;
    for (const [k, x] of Object.entries(v)) {
      const c = own(checks, k);
      if (!c) return `an object with known keys only (${Object.keys(checks).join(', ')}); "${k}" is unknown`;
      const want = c(x);
      if (want) return `an object whose "${k}" is ${want}`;
    }
    return null;
  };

const HTTP_CHECKS: Record<string, Check> = {
  host: str,
  port: int(0, 65535),
  token: (v) => (v === null || (typeof v === 'string' && v.length > 0 && !/\s/.test(v)) ? null : 'null or a non-empty string without spaces'),
  tls: (v) => section({ key: file, cert: file }, '{ "key": "api.key", "cert": "api.crt" }', ['key', 'cert'])(v),
  // The HTTP limits (allowedHosts, maxConnections, timeouts, load shares, pageSize): their checks live with them.
  ...HTTP_OPTION_CHECKS,
};

const CHECKS: Record<string, Check> = {
  host: str,
  server: str,
  port: int(0, 65535),
  timeout: int(40, 3_600_000),
  settleDelay: int(0, 60_000),
  maxLineLength: int(8, 64 * 1024 * 1024),
  maxIdLength: int(1, 1024 * 1024),
  idTimeout: (v) => (v === null ? null : int(1, 3_600_000)(v)),
  rxBuffer: int(1, 1_000_000),
  rxHold: int(1, 255),
  rxBufferBytes: int(1, 1 << 30),
  stallAfter: (v) => (v === null ? null : int(1, 86_400_000)(v)),
  maxQueuedWrites: int(1, 1_000_000),
  window: int(1, 100),
  idLineTypes: (v) => (typeof v === 'boolean' ? null : 'true or false'),
  appRestart: (v) =>
    v === null ? 'an object' : section({ initialDelay: int(0, 86_400_000), maxDelay: int(0, 86_400_000), resetAfter: int(0, 86_400_000), trace: (x) => (typeof x === 'boolean' ? null : 'true or false') }, '{ "initialDelay": 1000, "maxDelay": 60000, "resetAfter": 60000, "trace": true }')(v),
  maxConnections: int(1, 10_000_000),
  maxConnectionsPerAddress: int(1, 10_000_000),
  maxSendBuffer: int(1024, 1 << 30),
  maxDevices: int(1, 100_000_000),
  maxBufferedBytes: int(1, 2 ** 40),
  maxPendingSends: int(1, 100_000_000),
  maxPendingBytes: int(1024, 2 ** 34),
  maxStrikes: int(0, 1_000_000),
  strikeWindow: int(1, 86_400_000),
  blockFor: int(0, 86_400_000),
  tls: section(TLS_CHECKS, '{ "key": "server.key", "cert": "server.crt", "ca": "ca.crt", "clientCerts": "off" }', ['key', 'cert']),
  auth: section(AUTH_CHECKS, '{ "devices": { "lamp-1": "sha256$…" }, "required": true }', ['devices']),
  mqtt: section(MQTT_CHECKS, '{ "url": "mqtt://127.0.0.1:1883", "prefix": "tether", "qos": 1 }', ['url']),
  clients: ids,
  allow: (v) => (v === null ? null : ids(v)),
  duplicateId: oneOf('ignore-new', 'replace-old'),
  apps: (v) =>
    Array.isArray(v) &&
    v.every(
      (a) =>
        a &&
        typeof a === 'object' &&
        typeof a.script === 'string' &&
        (a.clients === undefined || a.clients === '*' || ids(a.clients) === null) &&
        (a.type === undefined || (typeof a.type === 'string' && a.type.length > 0)) &&
        Object.keys(a).every((k) => k === 'script' || k === 'clients' || k === 'type'),
    )
      ? null
      : 'a list of { "script": "path", "clients": ["id", …] or "*", "type": "name" (instead of clients) }',
  types: (v) =>
    v && typeof v === 'object' && !Array.isArray(v) && Object.values(v).every((p) => ids(p) === null)
      ? null
      : '{ "type name": ["client ID or glob pattern like lamp-*", …] }',
  mesh: (v) => {
    if (v === null) return null;
    if (!v || typeof v !== 'object' || Array.isArray(v)) return 'null or { "path": "/dev/ttyUSB0", … }';
    const o = v as Record<string, unknown>;
    if (o.path === undefined) return 'an object with "path" (the serial device of the mesh root)';
    for (const [k, x] of Object.entries(o)) {
      const c = own(MESH_CHECKS, k);
      if (!c) return `an object with known keys only (${Object.keys(MESH_CHECKS).join(', ')}); "${k}" is unknown`;
      const want = c(x);
      if (want) return `an object whose "${k}" is ${want}`;
    }
    return null;
  },
  persist: (v) =>
    v === null ||
    (typeof v === 'string' && v.length > 0) ||
    (!!v &&
      typeof v === 'object' &&
      typeof (v as { dir?: unknown }).dir === 'string' &&
      Object.keys(v).every((k) => ['dir', 'fsync', 'compactEvery', 'compactBytes', 'maxOpenFiles'].includes(k)))
      ? null
      : 'null, a folder path, or { "dir": "./data", "fsync": false, "compactEvery": 2000, "compactBytes": 1048576, "maxOpenFiles": 256 }',
  http: (v) => {
    if (v === null) return null;
    if (!v || typeof v !== 'object' || Array.isArray(v)) return 'null (off) or { "host": "127.0.0.1", "port": 8124, "token": null }';
    for (const [k, x] of Object.entries(v)) {
      const c = own(HTTP_CHECKS, k);
      if (!c) return `an object with known keys only (${Object.keys(HTTP_CHECKS).join(', ')}); "${k}" is unknown`;
      const want = c(x);
      if (want) return `an object whose "${k}" is ${want}`;
    }
    const clash = httpLimitsProblem(v as Record<string, unknown>);
    return clash && `an object whose limits fit together: ${clash}`;
  },
  log: (v) =>
    v &&
    typeof v === 'object' &&
    Object.keys(v).every((k) => k === 'level' || k === 'format') &&
    (oneOf('debug', 'info', 'warn', 'error', 'silent')((v as { level?: unknown }).level === undefined ? 'info' : (v as { level?: unknown }).level) === null) &&
    (oneOf('pretty', 'json')((v as { format?: unknown }).format === undefined ? 'pretty' : (v as { format?: unknown }).format) === null)
      ? null
      : '{ "level": "debug"|"info"|"warn"|"error"|"silent", "format": "pretty"|"json" }',
};

function bad(where: string, msg: string): TetherError {
  return new TetherError('ERR_BAD_CONFIG', `${where}: ${msg}`);
}

/** The mqtt section with its TLS file paths made absolute (keys absent stay absent, so the result validates again). */
function resolveMqtt(m: NonNullable<TetherConfig['mqtt']>, baseDir: string): NonNullable<TetherConfig['mqtt']> {
  if (!m.tls) return m;
  const tls: Record<string, string> = {};
  for (const [k, v] of Object.entries(m.tls)) if (typeof v === 'string') tls[k] = path.resolve(baseDir, v);
  return { ...m, tls };
}

function resolveHttp(h: HttpConfig, baseDir: string): HttpConfig {
  return h.tls ? { ...h, tls: { key: path.resolve(baseDir, h.tls.key), cert: path.resolve(baseDir, h.tls.cert) } } : h;
}

/** Validates a parsed config object and fills in the defaults. */
export function resolveConfig(raw: unknown, where = 'config', baseDir = process.cwd()): TetherConfig {
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) throw bad(where, 'must be a JSON object, e.g. { "port": 8123 }');
  const obj = raw as Record<string, unknown>;
  const problems: string[] = [];
  for (const [key, value] of Object.entries(obj)) {
    if (key.startsWith('$') || key === 'comment') continue; // room for "$schema" and notes
    const check = own(CHECKS, key);
    if (!check) {
      problems.push(`unknown key "${key}". Known keys: ${Object.keys(CHECKS).join(', ')}`);
      continue;
    }
    const want = check(value);
    if (want) problems.push(`"${key}" must be ${want}, got ${shown(value)}`);
  }
  if (problems.length > 0) throw bad(where, problems.join('; '));
  const merged = { ...CONFIG_DEFAULTS, ...obj } as typeof CONFIG_DEFAULTS;
  return {
    ...merged,
    log: { ...CONFIG_DEFAULTS.log, ...(obj.log as object) },
    http: obj.http === null ? null : resolveHttp({ ...HTTP_CONFIG_DEFAULTS, ...(obj.http as object) }, baseDir),
    idTimeout: merged.idTimeout ?? merged.timeout,
    stallAfter: merged.stallAfter ?? merged.timeout,
    appRestart: { ...APP_RESTART_DEFAULTS, ...(obj.appRestart as object) },
    mqtt: merged.mqtt && resolveMqtt(merged.mqtt, baseDir),
    // `ca` stays absent when not given: an "ca": undefined key would not pass the check again.
    tls: merged.tls && {
      ...merged.tls,
      key: path.resolve(baseDir, merged.tls.key),
      cert: path.resolve(baseDir, merged.tls.cert),
      ...(merged.tls.ca === undefined ? {} : { ca: path.resolve(baseDir, merged.tls.ca) }),
    },
    baseDir,
  };
}

/** Reads and validates a config file. */
export function loadConfig(file: string): TetherConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw bad(file, `cannot read it (${(e as NodeJS.ErrnoException).code ?? e}): check the path, or omit --config to use the defaults`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw bad(file, `not valid JSON (${(e as Error).message}): fix the syntax`);
  }
  return resolveConfig(raw, file, path.dirname(path.resolve(file)));
}
