/**
 * The fleet over HTTP: a JSON API, a WebSocket feed for the dashboard, Prometheus
 * metrics and the dashboard's static files, all on one Node `http` server.
 *
 *   GET  /api/devices[?type=&status=&q=&sort=&dir=&limit=&offset=]   devices, filtered, sorted, one page
 *   GET  /api/devices/:id                               one device, its recent lines and telemetry
 *   GET  /api/devices/:id/telemetry/:name[?from=&to=]   samples of one telemetry name
 *   POST /api/devices/:id/messages                      send one line to a device
 *   POST /api/broadcast                                 send one line to a type or to everyone
 *   GET  /metrics                                       Prometheus text
 *   GET  /ws                                            WebSocket (INIT / PAGE / UPDT / MSG; FILT / MORE / SEL)
 *   GET  /, /dashboard/…, /vendor/uplot/…               the dashboard
 *
 * Nothing a client of this server does may starve the device links, which share
 * its event loop: requests are served only for allowed Host names (DNS
 * rebinding), sockets are bounded in number (in total and per address) and in
 * time (headers, request, keep-alive), the event-loop time spent for each
 * client address and for all of them is metered against a budget, WebSocket
 * messages are rate limited per browser and their expensive answers coalesced,
 * and every answer is bounded in size (pages).
 *
 * It uses only the public surfaces of Server, Connection and Fleet.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import { isIP } from 'node:net';
import type { AddressInfo, Socket } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import * as prom from 'prom-client';
import { WebSocket, WebSocketServer } from 'ws';
import { uncaughtErrors } from './apps';
import type { AppRunner } from './apps';
import type { MqttBridge } from './bridge';
import type { Connection } from './connection';
import { ENDPOINT_DEFAULTS } from './endpoint';
import { TetherError } from './errors';
import type { Counters } from './endpoint';
import { LIMIT_NAMES, throttledWarn } from './limits';
import { FleetBusyError } from './fleet';
import type { DeviceInfo, Fleet, SendOutcome } from './fleet';
import { silentLogger } from './log';
import type { Logger } from './log';
import { payloadProblem } from './protocol/lines';
import { SERVER_DEFAULTS } from './server';
import type { HandshakeStats, Server } from './server';
import type { Sample } from './telemetry';

// ---- options and limits -------------------------------------------------------

/**
 * The limits that keep the API's clients from starving the device links. Each has
 * a default (HTTP_LIMIT_DEFAULTS) and is validated (HTTP_OPTION_CHECKS, also used
 * by the config loader for the "http" section).
 */
export interface HttpLimitOptions {
  /**
   * Host names (the request's Host header, without the port) served besides the
   * loopback names and the addresses the server listens on. An entry is a name
   * (`gateway.local`), a domain with a leading dot (`.example.com`: it and every
   * name under it) or an IP address; `"*"` serves any Host, which lets any web
   * page reach the API through DNS rebinding. Default none.
   */
  allowedHosts: string[];
  /** HTTP and WebSocket sockets open at once; beyond it an idle one is closed for a newcomer, or the newcomer is. Default 256. */
  maxConnections: number;
  /** Of those, from one IP address. Default 32. */
  maxConnectionsPerAddress: number;
  /** ms a client has to send a request's headers. Default 10000. */
  headersTimeout: number;
  /** ms a client has to send a whole request (headers and body). Default 30000. */
  requestTimeout: number;
  /** ms an idle keep-alive socket is kept open. Default 5000. */
  keepAliveTimeout: number;
  /** Share of the event loop's time (0-1) that one client address may use; beyond it, 429 or a paused WebSocket. Default 0.1. */
  maxClientLoad: number;
  /** Share of the event loop's time (0-1) that all HTTP and WebSocket clients together may use; beyond it, 503. Default 0.25. */
  maxLoad: number;
  /** Devices per WebSocket page (INIT, PAGE, UPDT); the browser asks for more. Default 500. */
  pageSize: number;
}

export const HTTP_LIMIT_DEFAULTS: Readonly<HttpLimitOptions> = Object.freeze({
  allowedHosts: [],
  maxConnections: 256,
  maxConnectionsPerAddress: 32,
  headersTimeout: 10_000,
  requestTimeout: 30_000,
  keepAliveTimeout: 5_000,
  maxClientLoad: 0.1,
  maxLoad: 0.25,
  pageSize: 500,
});

const intIn =
  (min: number, max: number) =>
  (v: unknown): string | null =>
    Number.isInteger(v) && (v as number) >= min && (v as number) <= max ? null : `an integer from ${min} to ${max}`;
const share = (v: unknown): string | null =>
  typeof v === 'number' && Number.isFinite(v) && v > 0 && v <= 1 ? null : 'a number above 0 and at most 1 (a share of the event loop\'s time, e.g. 0.1)';

/** One allowedHosts entry: `*`, a name, `.domain` or an IP address (IPv6 with or without brackets). */
const HOST_ENTRY = /^(\*|\.?[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?|\[?[0-9a-f:.]+\]?)$/i;

/** null if the value is fine, else what it must be (the config loader says "…must be <this>"). */
export const HTTP_OPTION_CHECKS: Record<keyof HttpLimitOptions, (v: unknown) => string | null> = {
  allowedHosts: (v) =>
    Array.isArray(v) && v.every((h) => typeof h === 'string' && HOST_ENTRY.test(h) && !(h.includes(':') && isIP(h.replace(/^\[|\]$/g, '')) === 0))
      ? null
      : 'a list of the host names this server is reached by, without ports, e.g. ["gateway.local", ".example.com", "192.168.1.10"] ("*" alone turns the check off, which is unsafe: see docs/security.md)',
  maxConnections: intIn(1, 1_000_000),
  maxConnectionsPerAddress: intIn(1, 1_000_000),
  headersTimeout: intIn(100, 3_600_000),
  requestTimeout: intIn(100, 3_600_000),
  keepAliveTimeout: intIn(100, 3_600_000),
  maxClientLoad: share,
  maxLoad: share,
  pageSize: intIn(1, 10_000),
};

/** Validates the limit options (each, and how they relate) and fills in the defaults; throws ERR_BAD_CONFIG saying what to change. */
export function resolveHttpLimits(opts: Partial<HttpLimitOptions>): HttpLimitOptions {
  const o: HttpLimitOptions = { ...HTTP_LIMIT_DEFAULTS, allowedHosts: [...HTTP_LIMIT_DEFAULTS.allowedHosts] };
  for (const k of Object.keys(HTTP_OPTION_CHECKS) as Array<keyof HttpLimitOptions>) {
    const v = opts[k];
    if (v === undefined) continue;
    const want = HTTP_OPTION_CHECKS[k](v);
    if (want) throw new TetherError('ERR_BAD_CONFIG', `http.${k} must be ${want}; got ${JSON.stringify(v)}`);
    (o as unknown as Record<string, unknown>)[k] = k === 'allowedHosts' ? [...(v as string[])] : v;
  }
  const fix = (msg: string) => new TetherError('ERR_BAD_CONFIG', msg);
  if (o.maxConnectionsPerAddress > o.maxConnections) {
    throw fix(`http.maxConnectionsPerAddress (${o.maxConnectionsPerAddress}) is above http.maxConnections (${o.maxConnections}): lower it or raise maxConnections`);
  }
  if (o.headersTimeout > o.requestTimeout) {
    throw fix(`http.headersTimeout (${o.headersTimeout} ms) is longer than http.requestTimeout (${o.requestTimeout} ms), which includes the headers: lower headersTimeout or raise requestTimeout`);
  }
  if (o.maxClientLoad > o.maxLoad) {
    throw fix(`http.maxClientLoad (${o.maxClientLoad}) is above http.maxLoad (${o.maxLoad}), the share of all clients together: lower maxClientLoad or raise maxLoad`);
  }
  if (o.allowedHosts.includes('*') && o.allowedHosts.length > 1) {
    throw fix('http.allowedHosts: "*" serves every host name, so the other entries mean nothing: give ["*"] alone (unsafe) or only names');
  }
  return o;
}

/** What is wrong with how the limit options relate (each one valid on its own), or null: for the config loader. */
export function httpLimitsProblem(opts: Partial<HttpLimitOptions>): string | null {
  try {
    resolveHttpLimits(opts);
    return null;
  } catch (e) {
    return (e as Error).message;
  }
}

export interface HttpApiOptions extends Partial<HttpLimitOptions> {
  server: Server;
  fleet: Fleet;
  /** Address to listen on. Default `127.0.0.1` (only this machine). */
  host?: string;
  /** TCP port. Default 8124; 0 = any free port (see `api.port`). */
  port?: number;
  /** If set, every POST needs `Authorization: Bearer <token>`. GETs and the WebSocket stay open. */
  token?: string | null;
  logger?: Logger;
  /** Folder with the dashboard (index.html, app.js, style.css). Default: `dashboard/` of this repository. */
  dashboardDir?: string;
  /** The MQTT bridge, if any: its state goes into /metrics. */
  bridge?: MqttBridge | null;
  /** Serve HTTPS (and WSS) with this PEM key and certificate (file paths). Default: plain HTTP. */
  tls?: { key: string; cert: string } | null;
  /** Most browsers connected to /ws at once. Default 64. */
  maxBrowsers?: number;
  /** Bytes queued for one browser before it is dropped as too slow. Default 1 MiB. */
  maxBrowserQueue?: number;
  /** ms between WebSocket pings; a browser that misses one pong is dropped. Default 30000. */
  pingInterval?: number;
}

export const HTTP_DEFAULTS = { host: '127.0.0.1', port: 8124, token: null } as const;

/** Lines kept per device for GET /api/devices/:id… */
export const RECENT_LINES = 50;
/** …and at most this much text per device (fewer lines when they are long). */
export const RECENT_CHARS = 256 * 1024;
/** Samples per telemetry name in GET /api/devices/:id. */
export const RECENT_SAMPLES = 100;
/** Largest POST body. */
export const MAX_BODY = 64 * 1024;
/** Largest WebSocket message answered with ERR; larger ones up to 4× this, too; beyond, the socket is closed (1009). */
export const MAX_WS_MESSAGE = 16 * 1024;
/** Default and largest `timeout` of a POST, ms. */
export const SEND_TIMEOUT = { default: 10_000, max: 600_000 } as const;
/** Shortest gap between two UPDT messages to one browser, ms. */
export const UPDT_INTERVAL = 250;
/** Most POSTs waiting for devices at once; more get 503. */
const MAX_PENDING_SENDS = 1000;
/** GET /api/devices: devices per page by default, and at most. */
export const LIST_LIMIT = { default: 1000, max: 10_000 } as const;
/** A WebSocket page (INIT, PAGE, UPDT) stops adding devices once its JSON is this big (it always has at least one). */
export const PAGE_BYTES = 256 * 1024;
/** Shortest gap between two INITs to one browser, ms: a burst of FILTs costs one INIT, with the last filter. */
export const INIT_INTERVAL = 100;
/** Messages a browser may send per second on /ws, and in one burst; beyond, its socket is paused (TCP pushes back). */
export const BROWSER_MESSAGES = { perSecond: 20, burst: 40 } as const;
/** A client address (or all of them) owing more than this many ms of event-loop time has its new sockets closed on arrival. */
const REFUSE_SOCKETS_OWING = 1000;
/** A browser this many messages past its rate (sent before its pause took hold) is dropped. */
const FLOOD_DEBT = BROWSER_MESSAGES.burst;
/** Requests one socket may have in flight (pipelined, not yet answered); beyond, the socket is closed. */
export const MAX_PIPELINED = 16;
/** A browser that has not loaded every matching device gets a fresh count of them at most this often, ms. */
const COUNT_INTERVAL = 5000;
/** Event-loop time a request is charged at least, ms (Node's own parsing and writing is not measured). */
const MIN_CHARGE = 0.05;
/** Work over every device (selecting a page, counting) runs in slices of at most this many ms; device links are served in between. */
export const SLICE_MS = 8;
/** Client addresses whose budget is remembered; the least recently used are forgotten first. */
const MAX_BUDGET_ADDRESSES = 10_000;

/** HTTP limit hits, counted by the HttpApi and exported with the server's in `tether_limit_hits_total{limit}`. */
export const HTTP_LIMIT_NAMES = ['httpConnections', 'httpHost', 'httpLoad', 'httpPipelining'] as const;
export type HttpLimitName = (typeof HTTP_LIMIT_NAMES)[number];

// ---- filters (shared by GET /api/devices and the WebSocket) ---------------------

export const SORT_FIELDS = ['id', 'type', 'status', 'lastSeen', 'outages', 'messages'] as const;
export type SortField = (typeof SORT_FIELDS)[number];

export interface Filter {
  /** Only devices of this type; null = any. */
  type: string | null;
  status: 'up' | 'down' | null;
  /** Case-insensitive substring of the ID, the type or the metadata's JSON; '' = any. */
  q: string;
  sort: SortField;
  dir: 'asc' | 'desc';
}

export const DEFAULT_FILTER: Readonly<Filter> = Object.freeze({ type: null, status: null, q: '', sort: 'id', dir: 'asc' });

/** The lowercased text `q` is searched in, per metadata object (a device's metadata is replaced, not changed, when it declares new). */
const metaText = new WeakMap<object, string>();
function metaSearchText(meta: Record<string, unknown>): string {
  let t = metaText.get(meta);
  if (t === undefined) metaText.set(meta, (t = JSON.stringify(meta).toLowerCase()));
  return t;
}

/** What a filter and a sort look at: a DeviceInfo, or the light row built for selecting a page. */
export type Sortable = Pick<DeviceInfo, 'id' | 'type' | 'meta' | 'status' | 'lastSeen'> & { counters: Pick<Counters, 'outages' | 'messagesIn' | 'messagesOut'> };

export function matchesFilter(d: Sortable, f: Filter): boolean {
  if (f.type !== null && d.type !== f.type) return false;
  if (f.status !== null && d.status !== f.status) return false;
  if (f.q) {
    const q = f.q.toLowerCase();
    if (!d.id.toLowerCase().includes(q) && !(d.type ?? '').toLowerCase().includes(q) && !metaSearchText(d.meta).includes(q)) {
      return false;
    }
  }
  return true;
}

const collator = new Intl.Collator('en', { numeric: true });
const STATUS_RANK: Record<DeviceInfo['status'], number> = { up: 0, down: 1, closed: 2 };
const SORT_KEY: Record<SortField, (d: Sortable) => string | number | null> = {
  id: (d) => d.id,
  type: (d) => d.type,
  status: (d) => STATUS_RANK[d.status],
  lastSeen: (d) => d.lastSeen,
  outages: (d) => d.counters.outages,
  messages: (d) => d.counters.messagesIn + d.counters.messagesOut,
};

/** Orders by the filter's field and direction; missing values (no type, never seen) last; ties by ID. */
export function compareDevices(f: Filter): (a: Sortable, b: Sortable) => number {
  const key = SORT_KEY[f.sort];
  const sign = f.dir === 'desc' ? -1 : 1;
  return (a, b) => {
    const x = key(a);
    const y = key(b);
    if (x !== y) {
      if (x === null) return 1;
      if (y === null) return -1;
      const c = typeof x === 'string' && typeof y === 'string' ? collator.compare(x, y) : (x as number) - (y as number);
      if (c !== 0) return sign * c;
    }
    return collator.compare(a.id, b.id);
  };
}

export function selectDevices<T extends Sortable>(all: T[], f: Filter): T[] {
  return all.filter((d) => matchesFilter(d, f)).sort(compareDevices(f));
}

/**
 * The items at sorted positions [offset, offset + limit) of everything add()ed,
 * without sorting it all: a bounded heap, O(n log(offset + limit)). `kept`: how
 * many were added.
 */
export class TopK<T> {
  private readonly heap: T[] = []; // the worst of the best `want` on top
  private readonly want: number;
  kept = 0;
  constructor(
    private readonly cmp: (a: T, b: T) => number,
    private readonly offset: number,
    limit: number,
  ) {
    this.want = offset + limit;
  }
  add(x: T): void {
    this.kept++;
    const h = this.heap;
    const cmp = this.cmp;
    if (h.length < this.want) {
      h.push(x);
      for (let i = h.length - 1; i > 0; ) {
        const p = (i - 1) >> 1;
        if (cmp(h[i], h[p]) <= 0) break;
        [h[i], h[p]] = [h[p], h[i]];
        i = p;
      }
    } else if (this.want > 0 && cmp(x, h[0]) < 0) {
      h[0] = x;
      for (let i = 0; ; ) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && cmp(h[l], h[m]) > 0) m = l;
        if (r < h.length && cmp(h[r], h[m]) > 0) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m], h[i]];
        i = m;
      }
    }
  }
  /** The page, in order. */
  page(): T[] {
    return [...this.heap].sort(this.cmp).slice(this.offset);
  }
}

/** TopK over `items` that `keep` accepts, in one go (the HttpApi feeds one in slices instead). */
export function selectTop<T>(items: Iterable<T>, keep: (x: T) => boolean, cmp: (a: T, b: T) => number, offset: number, limit: number): { page: T[]; kept: number } {
  const top = new TopK(cmp, offset, limit);
  for (const x of items) if (keep(x)) top.add(x);
  return { page: top.page(), kept: top.kept };
}

// ---- validation: every check of what a client sends lives here ------------------

/** A request that cannot be served as sent: answered with `status` and `{ error: message, ...extra }`. */
export class HttpProblem extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

const bad = (msg: string) => new HttpProblem(400, msg);
const plain = (x: unknown): x is Record<string, unknown> => !!x && typeof x === 'object' && !Array.isArray(x);
const sortList = SORT_FIELDS.join(', ');

function checkKeys(o: Record<string, unknown>, known: string[], what: string): void {
  const unknown = Object.keys(o).filter((k) => !known.includes(k));
  if (unknown.length > 0) throw bad(`${what}: unknown key ${JSON.stringify(unknown[0])}; the keys are ${known.join(', ')}`);
}

function oneOfValue<T extends string>(v: unknown, options: readonly T[], name: string): T {
  if (typeof v !== 'string' || !options.includes(v as T)) {
    throw bad(`${name} must be one of ${options.join(', ')}; got ${JSON.stringify(v)}`);
  }
  return v as T;
}

export const validate = {
  /** The query string of GET /api/devices. */
  listQuery(params: URLSearchParams): Filter {
    const known = ['type', 'status', 'q', 'sort', 'dir', 'limit', 'offset'];
    const seen = new Set<string>();
    for (const k of params.keys()) {
      if (!known.includes(k)) {
        throw bad(`unknown query parameter ${JSON.stringify(k)}; use type, status (up|down), q, sort (${sortList}), dir (asc|desc), limit, offset`);
      }
      if (seen.has(k)) throw bad(`query parameter ${JSON.stringify(k)} given twice; give it once`);
      seen.add(k);
    }
    const f: Filter = { ...DEFAULT_FILTER };
    const type = params.get('type');
    if (type) f.type = type;
    const status = params.get('status');
    if (status) f.status = oneOfValue(status, ['up', 'down'] as const, 'status');
    f.q = params.get('q') ?? '';
    const sort = params.get('sort');
    if (sort) f.sort = oneOfValue(sort, SORT_FIELDS, 'sort');
    const dir = params.get('dir');
    if (dir) f.dir = oneOfValue(dir, ['asc', 'desc'] as const, 'dir');
    return f;
  },

  /** `limit` / `offset` of GET /api/devices (the filter's keys are checked by listQuery). */
  page(params: URLSearchParams): { limit: number; offset: number } {
    const num = (k: 'limit' | 'offset', dflt: number, min: number, max: number, what: string) => {
      const raw = params.get(k);
      if (raw === null || raw === '') return dflt;
      const n = /^[0-9]{1,10}$/.test(raw) ? Number(raw) : NaN;
      if (!(n >= min && n <= max)) throw bad(`${k} must be a whole number from ${min} to ${max} (${what}); got ${JSON.stringify(raw)}`);
      return n;
    };
    return {
      limit: num('limit', LIST_LIMIT.default, 1, LIST_LIMIT.max, `devices per page, default ${LIST_LIMIT.default}`),
      offset: num('offset', 0, 0, 1_000_000_000, 'devices to skip: the "next" of the previous page'),
    };
  },

  /** `from` / `to` of the telemetry query: ms since the epoch. */
  timeRange(params: URLSearchParams): { from: number; to: number } {
    for (const k of params.keys()) {
      if (k !== 'from' && k !== 'to') throw bad(`unknown query parameter ${JSON.stringify(k)}; use from and to (ms since the epoch)`);
    }
    const num = (k: 'from' | 'to', dflt: number) => {
      const raw = params.get(k);
      if (raw === null || raw === '') return dflt;
      const n = Number(raw);
      if (!Number.isFinite(n)) throw bad(`${k} must be a time in ms since the epoch (e.g. ${Date.now()}); got ${JSON.stringify(raw)}`);
      return n;
    };
    const from = num('from', -Infinity);
    const to = num('to', Infinity);
    if (from > to) throw bad(`from (${from}) is after to (${to}); swap them`);
    return { from, to };
  },

  /** The body of POST /api/devices/:id/messages (`withType` false) or /api/broadcast (true). */
  sendBody(body: unknown, withType: boolean, maxLineLength: number): { line: string; type?: string; timeout: number; accepted: boolean } {
    const example = withType ? '{"line": "text", "type": "lamp"}' : '{"line": "text"}';
    if (!plain(body)) throw bad(`the body must be a JSON object like ${example}`);
    const keys = withType ? ['line', 'type', 'timeout', 'accepted'] : ['line', 'timeout', 'accepted'];
    checkKeys(body, keys, 'body');
    const { line, type, timeout, accepted } = body;
    if (typeof line !== 'string' || line.length === 0) throw bad(`"line" must be a non-empty string, the line to send, e.g. ${example}`);
    const text = line.endsWith('\n') ? line.slice(0, -1) : line;
    const problem = payloadProblem(text, maxLineLength);
    if (problem === 'empty') throw bad('"line" is only "\\n"; send at least one character');
    if (problem === 'newline') throw bad('"line" has "\\n" inside; the protocol is line based: send one POST per line, or encode it (e.g. as JSON)');
    if (problem === 'too-long') throw bad(`"line" is ${Buffer.byteLength(text)} bytes; devices take at most ${maxLineLength - 2} (maxLineLength in the config)`);
    if (type !== undefined && (typeof type !== 'string' || type.length === 0)) throw bad('"type" must be a non-empty string (a device type); leave it out to send to every device');
    if (timeout !== undefined && !(Number.isInteger(timeout) && (timeout as number) >= 1 && (timeout as number) <= SEND_TIMEOUT.max)) {
      throw bad(`"timeout" must be a whole number of ms from 1 to ${SEND_TIMEOUT.max} (default ${SEND_TIMEOUT.default}); got ${JSON.stringify(timeout)}`);
    }
    if (accepted !== undefined && typeof accepted !== 'boolean') throw bad('"accepted" must be true (answer once the line is queued) or false (once the device ACKed it)');
    return { line: text, type: type as string | undefined, timeout: (timeout as number | undefined) ?? SEND_TIMEOUT.default, accepted: accepted === true };
  },

  /** A message from a browser on /ws; returns what to do. */
  wsMessage(raw: unknown, current: Filter): { t: 'FILT'; filter: Filter } | { t: 'SEL'; id: string | null } | { t: 'MORE' } {
    if (!plain(raw)) throw bad('send a JSON object: {"t": "FILT", …}, {"t": "MORE"} or {"t": "SEL", "id": "…"}');
    if (raw.t === 'MORE') {
      checkKeys(raw, ['t'], 'MORE');
      return { t: 'MORE' };
    }
    if (raw.t === 'SEL') {
      checkKeys(raw, ['t', 'id'], 'SEL');
      if (raw.id !== null && (typeof raw.id !== 'string' || raw.id.length === 0)) throw bad('SEL needs "id": a client ID, or null to stop');
      return { t: 'SEL', id: raw.id as string | null };
    }
    if (raw.t === 'FILT') {
      checkKeys(raw, ['t', 'type', 'status', 'q', 'sort', 'dir'], 'FILT');
      const f: Filter = { ...current };
      if (raw.type !== undefined) {
        if (raw.type !== null && typeof raw.type !== 'string') throw bad('FILT "type" must be a type name, or null for any type');
        f.type = raw.type || null;
      }
      if (raw.status !== undefined) f.status = raw.status === null ? null : oneOfValue(raw.status, ['up', 'down'] as const, 'FILT "status" (or null)');
      if (raw.q !== undefined) {
        if (typeof raw.q !== 'string') throw bad('FILT "q" must be a string ("" for no text filter)');
        f.q = raw.q;
      }
      if (raw.sort !== undefined) f.sort = oneOfValue(raw.sort, SORT_FIELDS, 'FILT "sort"');
      if (raw.dir !== undefined) f.dir = oneOfValue(raw.dir, ['asc', 'desc'] as const, 'FILT "dir"');
      return { t: 'FILT', filter: f };
    }
    throw bad(`unknown message type ${JSON.stringify(raw.t)}; send "t": "FILT", "MORE" or "SEL"`);
  },
};

// ---- static files -----------------------------------------------------------------

const CONTENT_TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.map': 'application/json; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.ico': 'image/x-icon',
  '.txt': 'text/plain; charset=utf-8',
};

const PLACEHOLDER = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tether</title></head>
<body><h1>tether</h1>
<p>The dashboard is not installed here (no dashboard/index.html). The API works:</p>
<ul><li><a href="/api/devices">/api/devices</a></li><li><a href="/metrics">/metrics</a></li></ul>
</body></html>
`;

function uplotDir(): string | null {
  try {
    return path.dirname(require.resolve('uplot'));
  } catch {
    return null;
  }
}

/**
 * Event-loop time spent since it started: the smaller of wall time and this
 * process's CPU time (wall time alone would charge a client for the OS running
 * another process meanwhile; CPU time alone, for the work of other threads).
 */
class Stopwatch {
  private readonly wall = performance.now();
  private readonly cpu = process.cpuUsage();
  ms(): number {
    const c = process.cpuUsage(this.cpu);
    return Math.min(performance.now() - this.wall, (c.user + c.system) / 1000);
  }
}

/**
 * Closes a socket that pipelined too much. Node then aborts every request the
 * socket had sent and not been answered (up to a thousand or more from one read),
 * each with an error whose stack trace is formatted at once, which under ts-node's
 * source maps costs tens of µs apiece; those traces say nothing, so they are not
 * collected while the socket's close event runs (Node's listener sits between ours).
 */
function cutQuietly(socket: Socket): void {
  let saved: number | null = null;
  const restore = () => {
    if (saved !== null) Error.stackTraceLimit = saved;
    saved = null;
  };
  socket.prependOnceListener('close', () => {
    saved = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    process.nextTick(restore); // should a listener in between throw
  });
  socket.once('close', restore);
  socket.destroy();
}

/** The soft limit on open files of this process (Linux), or null if unknown. */
function openFileLimit(): number | null {
  try {
    const m = /^Max open files\s+(\d+)/m.exec(fs.readFileSync('/proc/self/limits', 'utf8'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/** A socket's remote address and port: the same for a TCP socket and the TLS socket on top of it. */
function sockKey(s: Socket): string {
  return `${s.remoteAddress}|${s.remotePort}`;
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host.startsWith('127.');
}

// ---- budgets: event-loop time per client address and in total ----------------------

/** A token bucket: `perMs` tokens a millisecond up to `capacity`; taking may leave it below zero (a debt that must refill first). */
export class TokenBucket {
  private level: number;
  private at: number;
  constructor(
    readonly perMs: number,
    readonly capacity: number,
    now: number,
  ) {
    this.level = capacity;
    this.at = now;
  }
  private refill(now: number): void {
    if (now > this.at) {
      this.level = Math.min(this.capacity, this.level + (now - this.at) * this.perMs);
      this.at = now;
    }
  }
  /** Tokens now (negative while in debt). */
  tokens(now: number): number {
    this.refill(now);
    return this.level;
  }
  take(n: number, now: number): void {
    this.refill(now);
    this.level -= n;
  }
  /** ms until at least `n` tokens are there (0 = now). */
  waitFor(n: number, now: number): number {
    this.refill(now);
    return this.level >= n ? 0 : (n - this.level) / this.perMs;
  }
  full(now: number): boolean {
    this.refill(now);
    return this.level >= this.capacity;
  }
}

/**
 * The event-loop time spent for HTTP and WebSocket clients, metered after the fact:
 * each client address may spend `clientShare` of the time and all together
 * `totalShare`, with bursts of up to one second's worth. Work is charged when done;
 * a client in debt waits (429, a paused WebSocket, a later INIT) until its bucket
 * has refilled, so however it asks, it gets no more than its share.
 */
export class LoadBudget {
  private readonly total: TokenBucket;
  private readonly clients = new Map<string, TokenBucket>();
  constructor(
    readonly clientShare: number,
    readonly totalShare: number,
    now: number,
    private readonly maxAddresses = MAX_BUDGET_ADDRESSES,
  ) {
    this.total = new TokenBucket(totalShare, totalShare * 1000, now);
  }
  private client(address: string, now: number, create: boolean): TokenBucket | undefined {
    let b = this.clients.get(address);
    if (!b && create) {
      b = new TokenBucket(this.clientShare, this.clientShare * 1000, now);
      this.clients.set(address, b);
      // Forget the least recently charged addresses first; a forgotten address starts afresh (the total still holds).
      for (const a of this.clients.keys()) {
        if (this.clients.size <= this.maxAddresses) break;
        if (a !== address) this.clients.delete(a);
      }
    }
    return b;
  }
  /** ms until `address` may be served, and whose budget it waits for (the client's own or everyone's); 0 = now. */
  wait(address: string, now: number): { ms: number; who: 'client' | 'all' } {
    const mine = this.client(address, now, false)?.waitFor(0, now) ?? 0;
    const all = this.total.waitFor(0, now);
    return mine >= all ? { ms: mine, who: 'client' } : { ms: all, who: 'all' };
  }
  /** Records `ms` of event-loop time spent for `address`. */
  charge(address: string, ms: number, now: number): void {
    const b = this.client(address, now, true)!;
    // Most recently charged last, so the oldest are the ones forgotten.
    this.clients.delete(address);
    this.clients.set(address, b);
    b.take(ms, now);
    this.total.take(ms, now);
  }
  /** Addresses remembered now (bounded). */
  get addresses(): number {
    return this.clients.size;
  }
}

/** What a step of queued work says: finished, more to do, or wait this many ms first (its client owes time). */
export type StepResult = 'done' | 'more' | number;

/**
 * Work for clients that can take long (a pass over every device, building a page,
 * an UPDT): steps run in turn, round robin, at most `sliceMs` of them per turn of
 * the event loop; the next batch waits for the next turn, after the device links'
 * I/O. Many requests at once therefore cost them time, never a stall.
 */
export class WorkQueue {
  private readonly jobs: Array<() => StepResult> = [];
  private scheduled = false;
  private readonly waiting = new Set<NodeJS.Timeout>();
  constructor(private readonly sliceMs: number) {}
  /** Adds a job: `step` is called until it says done (a throw counts as done). */
  add(step: () => StepResult): void {
    this.jobs.push(step);
    this.schedule();
  }
  /** Jobs queued or waiting. */
  get size(): number {
    return this.jobs.length + this.waiting.size;
  }
  /** Drops every job (closing). */
  clear(): void {
    this.jobs.length = 0;
    for (const t of this.waiting) clearTimeout(t);
    this.waiting.clear();
  }
  private schedule(): void {
    if (this.scheduled || this.jobs.length === 0) return;
    this.scheduled = true;
    setImmediate(this.drain);
  }
  private readonly drain = (): void => {
    this.scheduled = false;
    const end = performance.now() + this.sliceMs;
    while (this.jobs.length > 0 && performance.now() < end) {
      const step = this.jobs.shift()!;
      let r: StepResult;
      try {
        r = step();
      } catch {
        r = 'done';
      }
      if (r === 'more') this.jobs.push(step);
      else if (typeof r === 'number') {
        const t = setTimeout(() => {
          this.waiting.delete(t);
          this.jobs.push(step);
          this.schedule();
        }, Math.max(1, Math.ceil(r)));
        t.unref();
        this.waiting.add(t);
      }
    }
    this.schedule();
  };
}

// ---- Host check (DNS rebinding) --------------------------------------------------------

/** The host name of a Host header, lowercased, without port or trailing dot (IPv6 without brackets); null if malformed. */
export function hostOf(header: string): string | null {
  let h = header.trim().toLowerCase();
  if (h.startsWith('[')) {
    const end = h.indexOf(']');
    if (end < 0) return null;
    const rest = h.slice(end + 1);
    if (rest !== '' && !/^:[0-9]{1,5}$/.test(rest)) return null;
    h = h.slice(1, end);
    return isIP(h) === 6 ? h : null;
  }
  const colon = h.indexOf(':');
  if (colon >= 0) {
    if (!/^:[0-9]{1,5}$/.test(h.slice(colon))) return null;
    h = h.slice(0, colon);
  }
  if (h.endsWith('.')) h = h.slice(0, -1);
  return /^[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?$/.test(h) ? h : null;
}

function loopbackName(h: string): boolean {
  return h === 'localhost' || h.endsWith('.localhost') || (isIP(h) === 4 && h.startsWith('127.')) || h === '::1' || /^::ffff:127\./.test(h);
}

/**
 * Which Host headers are served. A web page whose own name was made to resolve to
 * this server (DNS rebinding) sends its own name as the Host; only the names this
 * server is really reached by are served: loopback names and addresses, the
 * address it listens on (every address of this machine when it listens on all of
 * them), and `allowedHosts`.
 */
export class HostCheck {
  private readonly any: boolean;
  private readonly names = new Set<string>();
  private readonly domains: string[] = [];
  private readonly wildcard: boolean;
  private local = new Set<string>();
  private localAt = -Infinity;
  constructor(
    allowed: readonly string[],
    listenHost: string,
    private readonly interfaces: () => string[] = machineAddresses,
  ) {
    this.any = allowed.includes('*');
    for (const raw of allowed) {
      const e = raw.toLowerCase().replace(/^\[|\]$/g, '');
      if (e.startsWith('.')) this.domains.push(e.slice(1));
      else this.names.add(e);
    }
    const listen = listenHost.toLowerCase().replace(/^\[|\]$/g, '');
    this.wildcard = listen === '' || listen === '0.0.0.0' || listen === '::';
    if (!this.wildcard) this.names.add(listen);
  }
  /** Whether a request with this Host header (undefined: none sent, as HTTP/1.0 clients may) is served. */
  allows(header: string | undefined, now = Date.now()): boolean {
    if (this.any || header === undefined) return true;
    const h = hostOf(header);
    if (h === null) return false;
    if (loopbackName(h) || this.names.has(h)) return true;
    for (const d of this.domains) if (h === d || h.endsWith('.' + d)) return true;
    if (this.wildcard && isIP(h) !== 0) {
      // The machine's addresses change (DHCP, VPNs): look again on a miss, at most every 5 s.
      if (!this.local.has(h) && now - this.localAt > 5000) {
        this.local = new Set(this.interfaces().map((a) => a.toLowerCase()));
        this.localAt = now;
      }
      return this.local.has(h);
    }
    return false;
  }
}

function machineAddresses(): string[] {
  const out: string[] = [];
  for (const list of Object.values(os.networkInterfaces())) for (const a of list ?? []) out.push(a.address.replace(/%.*$/, ''));
  return out;
}

// ---- the server -----------------------------------------------------------------

interface RecentLine {
  t: number;
  dir: 'in' | 'out';
  line: string;
}

interface Browser {
  ws: WebSocket;
  remote: string;
  /** Its IP address: whose budget its work is charged to. */
  address: string;
  filter: Filter;
  selected: string | null;
  /** IDs sent to this browser (INIT, PAGE or UPDT) as matching its filter. */
  shown: Set<string>;
  /** True once it has been sent every device matching its filter; then new matches come with UPDT, as rows to add. */
  complete: boolean;
  /** Devices matching its filter, as last counted, and the count it was last sent. */
  total: number;
  sentTotal: number;
  countedAt: number;
  /** Something changed that may change `total` (only tracked while not complete). */
  countStale: boolean;
  /** IDs changed since the last UPDT (while not complete: only shown ones). */
  changed: Set<string>;
  timer: NodeJS.Timeout | null;
  lastUpdate: number;
  /** What it asked for and has not got yet: an INIT (after FILT) or a PAGE (MORE). */
  want: 'init' | 'page' | null;
  workTimer: NodeJS.Timeout | null;
  /** An INIT or PAGE is being computed (in slices); and the filter's generation, to drop a result a newer FILT made stale. */
  working: boolean;
  filterGen: number;
  counting: boolean;
  lastInit: number;
  /** Its message rate (BROWSER_MESSAGES), and the timer that resumes its paused socket. */
  messages: TokenBucket;
  resumeTimer: NodeJS.Timeout | null;
  alive: boolean;
}

/** A device as a page is selected: the fields filters and sorts read, without building its DeviceInfo. */
interface Row extends Sortable {
  conn: Connection;
}

type CounterKey = keyof Counters;
const SUMMED: CounterKey[] = ['connects', 'outages', 'messagesIn', 'messagesOut', 'retransmits', 'duplicatesDropped', 'bytesIn', 'bytesOut', 'badLines', 'longLines', 'shed', 'stalls'];
const REJECTIONS: Array<keyof HandshakeStats> = ['idTimeout', 'idTooLong', 'badId', 'unknownId', 'duplicateId', 'authFailed', 'closedEarly'];

export class HttpApi {
  readonly server: Server;
  readonly fleet: Fleet;
  readonly host: string;
  readonly token: string | null;
  /** The Prometheus registry behind /metrics (its own, not prom-client's global one). */
  readonly registry = new prom.Registry();
  private readonly wantedPort: number;
  private readonly log: Logger;
  private readonly dashboardDir: string;
  private readonly vendorDir = uplotDir();
  private readonly maxBrowsers: number;
  private readonly maxBrowserQueue: number;
  private readonly maxLineLength: number;
  private readonly http: http.Server;
  private readonly secure: boolean;
  private readonly bridge: MqttBridge | null;
  /** The app runner, once `tether serve` has one (setApps): its failures and states go into /metrics. */
  private apps: AppRunner | null = null;
  private readonly wss: WebSocketServer;
  private readonly browsers = new Set<Browser>();
  private readonly recent = new Map<string, { lines: RecentLine[]; chars: number }>();
  /** Connections whose counters the metrics add up (retired ones are folded into `retired`). */
  private readonly known = new Set<Connection>();
  private readonly retired = Object.fromEntries(SUMMED.map((k) => [k, 0])) as Record<CounterKey, number>;
  private readonly detach: Array<() => void> = [];
  private readonly heartbeat: NodeJS.Timeout;
  private pendingSends = 0;
  private listening = false;
  private closed = false;
  /** The limits in force (the options with their defaults). */
  readonly limitOptions: Readonly<HttpLimitOptions>;
  /** HTTP limit hits (also in `tether_limit_hits_total{limit}`). */
  readonly limits: Record<HttpLimitName, number> = { httpConnections: 0, httpHost: 0, httpLoad: 0, httpPipelining: 0 };
  private readonly budget: LoadBudget;
  private readonly work = new WorkQueue(SLICE_MS);
  private hosts: HostCheck;
  /** Open sockets per client address, and sockets with no request in progress (oldest first: the first closed when full). */
  private readonly perAddress = new Map<string, number>();
  private readonly idle = new Map<Socket, 0>();
  /** Requests in progress per TCP socket (pipelined ones included). */
  private readonly inFlight = new WeakMap<Socket, number>();
  /** TCP sockets by remote address and port: how an HTTPS request's TLS socket finds the one that was counted. */
  private readonly sockets = new Map<string, Socket>();
  private readonly released = new WeakSet<Socket>();
  private readonly socketInfo = new WeakMap<Socket, { address: string; key: string }>();
  private openSockets = 0;

  constructor(opts: HttpApiOptions) {
    this.limitOptions = Object.freeze(resolveHttpLimits(opts));
    this.server = opts.server;
    this.fleet = opts.fleet;
    this.host = opts.host ?? HTTP_DEFAULTS.host;
    this.wantedPort = opts.port ?? HTTP_DEFAULTS.port;
    this.token = opts.token ?? null;
    this.log = (opts.logger ?? silentLogger).child({ part: 'http' });
    this.dashboardDir = path.resolve(opts.dashboardDir ?? path.join(__dirname, '..', 'dashboard'));
    this.maxBrowsers = opts.maxBrowsers ?? 64;
    this.maxBrowserQueue = opts.maxBrowserQueue ?? 1024 * 1024;
    this.maxLineLength = this.server.opts.maxLineLength ?? ENDPOINT_DEFAULTS.maxLineLength;
    if (this.token !== null && (typeof this.token !== 'string' || this.token.length === 0)) {
      throw new TypeError('token must be a non-empty string, or null for none');
    }
    const lim = this.limitOptions;
    this.budget = new LoadBudget(lim.maxClientLoad, lim.maxLoad, performance.now());
    this.hosts = new HostCheck(lim.allowedHosts, this.host);
    if (lim.allowedHosts.includes('*')) {
      this.log.warn('http.allowedHosts is "*": any host name is served, so a web page can reach this API through DNS rebinding', {
        hint: 'list the names this server is reached by instead (e.g. ["gateway.local"])',
      });
    }

    if (!this.token && !isLoopback(this.host)) {
      this.log.warn('the HTTP API will listen beyond this machine without a token: anyone who reaches it can send lines to devices', {
        host: this.host,
        hint: 'set "token" in the "http" section, or "host": "127.0.0.1"',
      });
    }
    const handler = (req: http.IncomingMessage, res: http.ServerResponse) => void this.handle(req, res);
    this.secure = !!opts.tls;
    this.bridge = opts.bridge ?? null;
    const read = (what: string, file: string) => {
      try {
        return fs.readFileSync(file);
      } catch (e) {
        throw new TetherError('ERR_BAD_CONFIG', `http.tls.${what}: cannot read ${file} (${(e as NodeJS.ErrnoException).code ?? e}): check the path`);
      }
    };
    // Slowloris: headers and whole requests have deadlines, checked every second; idle keep-alive sockets close.
    const timing = {
      headersTimeout: lim.headersTimeout,
      requestTimeout: lim.requestTimeout,
      keepAliveTimeout: lim.keepAliveTimeout,
      connectionsCheckingInterval: Math.min(1000, Math.max(50, Math.floor(lim.headersTimeout / 4))),
    };
    if (opts.tls) {
      this.http = https.createServer({ key: read('key', opts.tls.key), cert: read('cert', opts.tls.cert), ...timing }, handler);
    } else {
      this.http = http.createServer(timing, handler);
    }
    this.http.keepAliveTimeout = lim.keepAliveTimeout;
    this.http.on('connection', (socket: Socket) => this.onSocket(socket));
    this.http.on('upgrade', (req, socket, head) => this.upgrade(req, socket as Socket, head));
    // allowSynchronousEvents off: a flood of small messages in one TCP read is handled one per turn of the event loop, not in one stretch.
    this.wss = new WebSocketServer({ noServer: true, maxPayload: 4 * MAX_WS_MESSAGE, allowSynchronousEvents: false });

    // Feeds: recent lines and MSG per Connection, UPDT from the fleet's events.
    for (const c of this.server.connections()) this.watch(c);
    const onConnection = (c: Connection) => this.watch(c);
    this.server.on('connection', onConnection);
    this.detach.push(() => this.server.off('connection', onConnection));
    for (const ev of ['connect', 'disconnect', 'message', 'telemetry', 'stalled', 'app']) {
      const fn = (d: DeviceInfo) => this.changed(d.id);
      this.fleet.on(ev, fn);
      this.detach.push(() => this.fleet.off(ev, fn));
    }

    this.setupMetrics();
    this.heartbeat = setInterval(() => this.ping(), opts.pingInterval ?? 30_000);
    this.heartbeat.unref();
  }

  /** Starts listening; resolves with the address. */
  listen(): Promise<AddressInfo> {
    if (this.closed) return Promise.reject(new Error('this HttpApi is closed; make a new one'));
    if (this.listening) return Promise.resolve(this.http.address() as AddressInfo);
    return new Promise((resolve, reject) => {
      const fail = (err: NodeJS.ErrnoException) => {
        const where = `${this.host}:${this.wantedPort}`;
        const hint =
          err.code === 'EADDRINUSE'
            ? `port ${this.wantedPort} is in use: set another "port" in the "http" section of the config or pass --http-port N (0 = any free port), or turn the HTTP API off with "http": null`
            : err.code === 'EADDRNOTAVAIL'
              ? `${this.host} is not an address of this machine: use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)`
              : err.code === 'EACCES'
                ? `port ${this.wantedPort} needs privileges: use a port above 1023`
                : 'check "host" and "port" in the "http" section of the config';
        reject(new Error(`HTTP API cannot listen on ${where} (${err.code ?? err.message}): ${hint}`));
      };
      this.http.once('error', fail);
      this.http.listen(this.wantedPort, this.host, () => {
        this.http.off('error', fail);
        this.http.on('error', (e) => this.log.error('HTTP server error', { error: e.message }));
        this.listening = true;
        this.log.info('HTTP API listening', { url: this.url, token: this.token ? 'required for POST' : 'none' });
        const fds = openFileLimit();
        const devices = this.server.opts.maxConnections ?? SERVER_DEFAULTS.maxConnections;
        if (fds !== null && fds < devices + this.limitOptions.maxConnections + 64) {
          this.log.warn('the open-file limit is below what the connection limits allow: under a flood, device links could find no descriptor', {
            openFileLimit: fds,
            maxConnections: devices,
            httpMaxConnections: this.limitOptions.maxConnections,
            hint: 'raise the limit (ulimit -n, LimitNOFILE= in a systemd unit) or lower maxConnections / http.maxConnections',
          });
        }

        resolve(this.http.address() as AddressInfo);
      });
    });
  }

  /** The port listened on (useful with port 0); 0 before listen(). */
  get port(): number {
    const a = this.http.address();
    return a && typeof a === 'object' ? a.port : 0;
  }

  /** Where a browser on this machine finds the dashboard, e.g. `http://127.0.0.1:8124/`. */
  get url(): string {
    const h = this.host === '0.0.0.0' ? '127.0.0.1' : this.host === '::' ? '[::1]' : this.host.includes(':') ? `[${this.host}]` : this.host;
    return `${this.secure ? 'https' : 'http'}://${h}:${this.port}/`;
  }

  /** Closes every WebSocket and HTTP connection and stops listening. The Server and Fleet stay as they are. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.heartbeat);
    for (const d of this.detach.splice(0)) d();
    const gone: Promise<void>[] = [];
    for (const b of this.browsers) {
      this.stopBrowser(b);
      gone.push(new Promise((r) => b.ws.once('close', () => r())));
      b.ws.close(1001, 'server shutting down');
    }
    // Browsers get a moment to answer the close frame, then their sockets are cut.
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.all(gone), new Promise((r) => (timer = setTimeout(r, 500)))]);
    clearTimeout(timer);
    for (const b of this.browsers) b.ws.terminate();
    this.browsers.clear();
    this.wss.close();
    if (this.listening) {
      const done = new Promise<void>((r) => this.http.close(() => r()));
      this.http.closeAllConnections();
      await done;
      this.listening = false;
      this.log.info('HTTP API closed');
    }
  }

  // ---- feeds ------------------------------------------------------------------

  private watch(c: Connection): void {
    if (this.closed) return;
    this.known.add(c);
    const onLine = (line: string) => this.remember(c.id, 'in', line.endsWith('\n') ? line.slice(0, -1) : line);
    const onSent = (payload: string) => {
      this.remember(c.id, 'out', payload);
      this.changed(c.id); // its counters moved: browsers get it with the next UPDT
    };
    const onClose = () => {
      // Retired by the app (the server forgot it): keep its counts in the totals.
      if (this.server.get(c.id) !== c && this.known.delete(c)) for (const k of SUMMED) this.retired[k] += c.counters[k];
    };
    c.on('line', onLine);
    c.on('sent', onSent);
    c.on('close', onClose);
    this.detach.push(() => {
      c.off('line', onLine);
      c.off('sent', onSent);
      c.off('close', onClose);
    });
  }

  private remember(id: string, dir: 'in' | 'out', line: string): void {
    const t = Date.now();
    let ring = this.recent.get(id);
    if (!ring) this.recent.set(id, (ring = { lines: [], chars: 0 }));
    ring.lines.push({ t, dir, line });
    ring.chars += line.length;
    while (ring.lines.length > RECENT_LINES || (ring.chars > RECENT_CHARS && ring.lines.length > 1)) ring.chars -= ring.lines.shift()!.line.length;
    for (const b of this.browsers) if (b.selected === id) this.sendTo(b, { t: 'MSG', id, dir, line, time: t });
  }

  // ---- sockets, limits and budgets ---------------------------------------------------

  private hit(name: HttpLimitName, msg: string, fields: Record<string, unknown>): void {
    this.limits[name]++;
    throttledWarn(this.log, msg, { limit: name, ...fields });
  }

  /**
   * A new socket: counted in total and per address. When all maxConnections are
   * taken, the socket idle the longest (no request in progress: a slowloris, or a
   * keep-alive socket between requests) is closed to make room, so idle sockets
   * cannot lock real clients out; only when every socket is busy is the newcomer refused.
   */
  private onSocket(socket: Socket): void {
    const address = socket.remoteAddress ?? '?';
    const lim = this.limitOptions;
    // A client far in debt (it was told with 429s), or all of them (503s), get no new socket until paid: nothing of it is parsed.
    const owed = this.budget.wait(address, performance.now());
    if (owed.ms > REFUSE_SOCKETS_OWING) {
      this.hit('httpLoad', owed.who === 'client' ? 'HTTP connection refused: its address is far over its share of the server time' : 'HTTP connection refused: the HTTP clients together are far over their share of the server time', {
        address,
        retryInMs: Math.ceil(owed.ms),
        hint:
          owed.who === 'client'
            ? 'the client sent more than http.maxClientLoad allows (a flood, or pipelining); it may connect again once its share has refilled'
            : 'the HTTP clients together ask for more than http.maxLoad allows; new connections are taken again once the share has refilled',
      });
      socket.destroy();
      return;
    }
    const mine = this.perAddress.get(address) ?? 0;
    if (mine >= lim.maxConnectionsPerAddress) {
      this.hit('httpConnections', 'HTTP connection refused: too many from one address', {
        address,
        maxConnectionsPerAddress: lim.maxConnectionsPerAddress,
        hint: 'raise http.maxConnectionsPerAddress if many clients share this address (a proxy, a NAT)',
      });
      socket.destroy();
      return;
    }
    if (this.openSockets >= lim.maxConnections) {
      const oldest = this.idle.keys().next();
      if (oldest.done) {
        this.hit('httpConnections', 'HTTP connection refused: maxConnections reached and none is idle', {
          address,
          maxConnections: lim.maxConnections,
          hint: 'raise http.maxConnections if this many clients are real (each costs a file descriptor the device links may need)',
        });
        socket.destroy();
        return;
      }
      this.hit('httpConnections', 'HTTP connection closed to make room: maxConnections reached', {
        address: oldest.value.remoteAddress,
        maxConnections: lim.maxConnections,
        hint: 'the socket idle the longest is closed for a newcomer; raise http.maxConnections if this many clients are real',
      });
      this.release(oldest.value);
      oldest.value.destroy();
    }
    this.openSockets++;
    this.perAddress.set(address, mine + 1);
    this.idle.set(socket, 0);
    // Kept now: a closed socket no longer knows its remote address.
    const key = sockKey(socket);
    this.socketInfo.set(socket, { address, key });
    this.sockets.set(key, socket);
    // Node's own work when a socket closes (aborting the requests it still had, pipelined) is charged to its client too.
    let closing: Stopwatch | null = null;
    socket.prependOnceListener('close', () => (closing = new Stopwatch()));
    socket.once('close', () => {
      this.release(socket);
      if (closing) this.charge(address, closing.ms());
    });
  }

  /** Uncounts a socket (once, whether it closed or was closed for a newcomer). */
  private release(socket: Socket): void {
    const info = this.socketInfo.get(socket);
    if (!info || this.released.has(socket)) return;
    this.released.add(socket);
    this.openSockets--;
    const n = (this.perAddress.get(info.address) ?? 1) - 1;
    if (n <= 0) this.perAddress.delete(info.address);
    else this.perAddress.set(info.address, n);
    this.idle.delete(socket);
    if (this.sockets.get(info.key) === socket) this.sockets.delete(info.key);
  }

  /** The TCP socket under a request's socket (for HTTPS, req.socket is the TLS socket on top of it). */
  private tcpOf(s: Socket): Socket | undefined {
    return this.sockets.get(sockKey(s));
  }

  /** Records `ms` of event-loop time spent for `address`. */
  private charge(address: string, ms: number): void {
    this.budget.charge(address, Math.max(MIN_CHARGE, ms), performance.now());
  }

  /** Host check and budget: throws the answer for a request that is not to be served. */
  private admit(host: string | undefined, address: string, now: number): void {
    if (!this.hosts.allows(host)) {
      this.hit('httpHost', 'HTTP request refused: a Host name this server does not know (DNS rebinding?)', {
        address,
        host,
        hint: 'if it is a name this server is reached by, add it to http.allowedHosts',
      });
      throw new HttpProblem(
        421,
        `this server does not answer to the host name ${JSON.stringify(host)}: if that is a name it is reached by, add it to "allowedHosts" ` +
          'in the "http" section of its config (a name it does not know is how a web page reaches a local server through DNS rebinding)',
        { Connection: 'close' },
      );
    }
    const w = this.budget.wait(address, now);
    if (w.ms > 0) {
      const secs = String(Math.max(1, Math.ceil(w.ms / 1000)));
      const lim = this.limitOptions;
      this.hit('httpLoad', w.who === 'client' ? 'HTTP client over its share of the server time: 429' : 'HTTP clients over their share of the server time: 503', {
        address,
        retryAfter: Number(secs),
        hint: w.who === 'client' ? 'one client asks for more than http.maxClientLoad allows' : 'the HTTP clients together ask for more than http.maxLoad allows',
      });
      throw w.who === 'client'
        ? new HttpProblem(
            429,
            `too many requests from ${address}: it used its share of the server's time (http.maxClientLoad ${lim.maxClientLoad}; the rest is kept for the devices and other clients); retry in ${secs} s`,
            { 'Retry-After': secs },
          )
        : new HttpProblem(
            503,
            `the server is busy: its HTTP clients together used their share of its time (http.maxLoad ${lim.maxLoad}; the rest is kept for the devices); retry in ${secs} s`,
            { 'Retry-After': secs },
          );
    }
  }

  // ---- HTTP -----------------------------------------------------------------------

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    req.on('error', () => {});
    res.on('error', () => {});
    const socket = req.socket;
    // A socket closed for pipelining too much: the requests it had already sent are dropped unanswered.
    if (socket.destroyed) return;
    const tcp = this.tcpOf(socket);
    if (tcp) {
      const n = (this.inFlight.get(tcp) ?? 0) + 1;
      this.inFlight.set(tcp, n);
      this.idle.delete(tcp);
      res.once('close', () => {
        const left = (this.inFlight.get(tcp) ?? 1) - 1;
        this.inFlight.set(tcp, left);
        // Between requests a keep-alive socket is idle again (newest last: the oldest idle is closed first when full).
        if (left === 0 && !this.released.has(tcp) && !tcp.destroyed) this.idle.set(tcp, 0);
      });
      if (n > MAX_PIPELINED) {
        this.hit('httpPipelining', 'HTTP connection closed: too many pipelined requests', {
          address: socket.remoteAddress,
          max: MAX_PIPELINED,
          hint: 'send a request after the answer to the previous one (or on several connections)',
        });
        cutQuietly(socket);
        return;
      }
    }
    const address = socket.remoteAddress ?? '?';
    const t0 = performance.now();
    const watch = new Stopwatch();
    let work: Promise<void>;
    try {
      this.admit(req.headers.host, address, t0);
      // What route() does before its first await (all of GET /api/devices, for one) is measured here.
      work = this.route(req, res, address);
    } catch (e) {
      work = Promise.reject(e);
    }
    this.charge(address, watch.ms());
    try {
      await work;
    } catch (e) {
      if (e instanceof HttpProblem) {
        this.log.debug('request refused', { method: req.method, url: req.url, status: e.status, error: e.message });
        this.json(res, e.status, { error: e.message }, e.headers);
      } else {
        this.log.error('request failed', { method: req.method, url: req.url, error: (e as Error).stack ?? String(e) });
        this.json(res, 500, { error: 'internal error (logged on the server); the request may be retried' });
      }
    }
  }

  /** Runs `fn` (synchronous work started after an await) and charges its time to `address`. */
  private timed<T>(address: string, fn: () => T): T {
    const watch = new Stopwatch();
    try {
      return fn();
    } finally {
      this.charge(address, watch.ms());
    }
  }

  private async route(req: http.IncomingMessage, res: http.ServerResponse, address: string): Promise<void> {
    const method = req.method ?? 'GET';
    let url: URL;
    try {
      url = new URL(req.url ?? '/', 'http://localhost');
    } catch {
      throw bad('malformed request URL');
    }
    const p = url.pathname;
    const allow = (...methods: string[]) => {
      if (methods.includes(method) || (method === 'HEAD' && methods.includes('GET'))) return;
      throw new HttpProblem(405, `${p} takes ${methods.join(' or ')}, not ${method}`, { Allow: methods.join(', ') });
    };

    if (p === '/api' || p.startsWith('/api/')) {
      const seg = p.split('/').slice(2).map((s) => {
        try {
          return decodeURIComponent(s);
        } catch {
          throw bad(`malformed percent-encoding in ${JSON.stringify(s)}; encode IDs with encodeURIComponent`);
        }
      });
      if (seg.length === 1 && seg[0] === 'devices') {
        allow('GET');
        const f = validate.listQuery(url.searchParams);
        const { limit, offset } = validate.page(url.searchParams);
        const { rows, total, rest } = await this.pick(address, f, offset, limit);
        return this.task(address, () =>
          this.json(res, 200, { devices: rows.map((r) => this.fleet.describe(r.conn)), total, next: rest > 0 ? offset + rows.length : null }),
        );
      }
      if (seg.length === 2 && seg[0] === 'devices') {
        allow('GET');
        noQuery(url);
        return this.json(res, 200, this.detail(this.device(seg[1])));
      }
      if (seg.length === 4 && seg[0] === 'devices' && seg[2] === 'telemetry') {
        allow('GET');
        const conn = this.device(seg[1]);
        const { from, to } = validate.timeRange(url.searchParams);
        return this.json(res, 200, { samples: conn.telemetry.query(seg[3], from, to) });
      }
      if (seg.length === 3 && seg[0] === 'devices' && seg[2] === 'messages') {
        allow('POST');
        this.authorize(req);
        noQuery(url);
        this.device(seg[1]);
        const body = validate.sendBody(await this.readJson(req), false, this.maxLineLength);
        return this.sendOne(res, seg[1], body, address);
      }
      if (seg.length === 1 && seg[0] === 'broadcast') {
        allow('POST');
        this.authorize(req);
        noQuery(url);
        const body = validate.sendBody(await this.readJson(req), true, this.maxLineLength);
        return this.broadcast(res, body, address);
      }
      throw new HttpProblem(
        404,
        `no API endpoint ${method} ${p}; there are GET /api/devices, GET /api/devices/:id, GET /api/devices/:id/telemetry/:name, ` +
          'POST /api/devices/:id/messages, POST /api/broadcast (IDs URL-encoded)',
      );
    }
    if (p === '/healthz') {
      // For monitors and load balancers: cheap, no device data, 200 while the server serves.
      allow('GET');
      let up = 0;
      for (const c of this.server.connections()) if (c.isUp) up++;
      return this.json(res, 200, { status: 'ok', devicesUp: up, devices: this.server.connections().length, uptimeSeconds: Math.round(process.uptime()) });
    }
    if (p === '/metrics') {
      allow('GET');
      const text = await this.registry.metrics();
      res.writeHead(200, { 'Content-Type': this.registry.contentType, 'Cache-Control': 'no-store' });
      res.end(text);
      return;
    }
    if (p === '/ws') throw new HttpProblem(426, '/ws is a WebSocket: open it with new WebSocket("ws://host:port/ws")', { Upgrade: 'websocket' });
    allow('GET');
    if (p.startsWith('/vendor/')) return this.vendor(res, p);
    return this.dashboard(res, p);
  }

  private device(id: string): Connection {
    const c = this.server.get(id);
    if (!c) throw new HttpProblem(404, `no device ${JSON.stringify(id)}: it has never connected; GET /api/devices lists the known ones`);
    return c;
  }

  private detail(c: Connection): { device: DeviceInfo; recent: RecentLine[]; telemetry: Record<string, Sample[]> } {
    const telemetry: Record<string, Sample[]> = {};
    for (const name of c.telemetry.names()) {
      // defineProperty: a telemetry name like "__proto__" stays an ordinary key.
      Object.defineProperty(telemetry, name, { value: c.telemetry.query(name).slice(-RECENT_SAMPLES), enumerable: true, writable: true, configurable: true });
    }
    return { device: this.fleet.describe(c), recent: [...(this.recent.get(c.id)?.lines ?? [])], telemetry };
  }

  private authorize(req: http.IncomingMessage): void {
    if (this.token === null) return;
    const m = /^Bearer\s+(.+)$/i.exec(req.headers.authorization ?? '');
    const digest = (s: string) => createHash('sha256').update(s).digest();
    if (!m || !timingSafeEqual(digest(m[1].trim()), digest(this.token))) {
      this.server.hitLimit('httpToken', 'HTTP request refused: missing or wrong token', { remote: req.socket.remoteAddress, path: req.url });
      throw new HttpProblem(
        401,
        req.headers.authorization
          ? 'wrong token: send the header "Authorization: Bearer <token>" with the "token" of the "http" section of the server\'s config'
          : 'this server needs a token for POST: send the header "Authorization: Bearer <token>" (the "token" of the "http" section of the server\'s config)',
        { 'WWW-Authenticate': 'Bearer realm="tether"' },
      );
    }
  }

  /** Reads a JSON body of at most MAX_BODY bytes. */
  private async readJson(req: http.IncomingMessage): Promise<unknown> {
    const type = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
    if (type !== 'application/json') {
      // Also what keeps other web pages from posting here: a cross-site JSON POST needs a preflight this server never grants.
      throw new HttpProblem(415, `send the body as JSON with the header "Content-Type: application/json" (got ${type ? JSON.stringify(type) : 'none'})`);
    }
    // Too big: answered at once, without reading the rest; the socket is then closed (Node stops reading it).
    const tooBig = (size: string) =>
      new HttpProblem(400, `the body is ${size} bytes; the limit is ${MAX_BODY} bytes (64 KiB): send a shorter line`, { Connection: 'close' });
    const declared = Number(req.headers['content-length']);
    if (declared > MAX_BODY) throw tooBig(String(declared));
    const chunks: Buffer[] = [];
    let size = 0;
    await new Promise<void>((resolve, reject) => {
      const onData = (chunk: Buffer) => {
        size += chunk.length;
        if (size <= MAX_BODY) chunks.push(chunk);
        else {
          req.off('data', onData);
          reject(tooBig(`over ${MAX_BODY}`));
        }
      };
      req.on('data', onData);
      req.on('end', () => resolve());
      req.on('error', (e) => reject(e));
      req.on('close', () => resolve());
    });
    const text = Buffer.concat(chunks).toString('utf8');
    if (text.trim() === '') throw bad('the body is empty; send a JSON object like {"line": "text"}');
    try {
      return JSON.parse(text);
    } catch (e) {
      throw bad(`the body is not valid JSON (${(e as Error).message}); send a JSON object like {"line": "text"}`);
    }
  }

  private async withSendSlot<T>(fn: () => Promise<T>): Promise<T> {
    if (this.pendingSends >= MAX_PENDING_SENDS) {
      throw new HttpProblem(503, `${MAX_PENDING_SENDS} messages are already waiting for devices; retry when some have been answered`, { 'Retry-After': '5' });
    }
    this.pendingSends++;
    try {
      return await fn();
    } finally {
      this.pendingSends--;
    }
  }

  private async sendOne(res: http.ServerResponse, id: string, body: { line: string; timeout: number; accepted: boolean }, address: string): Promise<void> {
    const outcome = await this.withSendSlot(() => this.timed(address, () => this.fleet.send(id, body.line, { timeout: body.timeout, accepted: body.accepted })));
    this.log.info('HTTP message', outcome.error ? { to: id, status: outcome.status, error: outcome.error } : { to: id, status: outcome.status });
    if (outcome.status !== 'failed') return this.json(res, 200, { id, status: outcome.status });
    // Too long for the device's link (a mesh node: one frame) or the fleet's sends are full (issue 14 items 13 and 5).
    if (outcome.code === 'ERR_LINE_TOO_LONG') return this.json(res, 413, { id, status: 'failed', error: outcome.error });
    if (outcome.code === 'ERR_BUSY') return this.json(res, 503, { id, status: 'failed', error: outcome.error }, { 'Retry-After': '5' });
    const timedOut = /^not acknowledged within/.test(outcome.error ?? '');
    const error = timedOut
      ? `${outcome.error}; retry later, raise "timeout" (up to ${SEND_TIMEOUT.max} ms), or send with "accepted": true to queue it for when the device is back`
      : outcome.error;
    this.json(res, timedOut ? 504 : 503, { id, status: 'failed', error });
  }

  private async broadcast(res: http.ServerResponse, body: { line: string; type?: string; timeout: number; accepted: boolean }, address: string): Promise<void> {
    const opts = { timeout: body.timeout, accepted: body.accepted };
    const outcomes: SendOutcome[] = await this.withSendSlot(() =>
      this.timed(address, () => (body.type !== undefined ? this.fleet.sendType(body.type, body.line, opts) : this.fleet.sendAll(body.line, opts))).catch((e: unknown) => {
        // The fleet's sends waiting for devices are at their bound (maxPendingSends / maxPendingBytes): nothing was sent.
        if (e instanceof FleetBusyError) throw new HttpProblem(503, e.message, { 'Retry-After': '5' });
        throw e;
      }),
    );
    const count = (s: SendOutcome['status']) => outcomes.filter((o) => o.status === s).length;
    this.log.info('HTTP broadcast', { type: body.type ?? '*', devices: outcomes.length, delivered: count('delivered'), accepted: count('accepted'), failed: count('failed') });
    this.json(res, 200, { outcomes });
  }

  private json(res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
    if (res.headersSent || res.destroyed) return;
    const text = JSON.stringify(body);
    res.writeHead(status, {
      'Content-Type': 'application/json; charset=utf-8',
      'Content-Length': Buffer.byteLength(text),
      'Cache-Control': 'no-store',
      'X-Content-Type-Options': 'nosniff',
      ...headers,
    });
    res.end(text);
  }

  // ---- static files ---------------------------------------------------------------

  private async vendor(res: http.ServerResponse, p: string): Promise<void> {
    const files: Record<string, string> = {
      '/vendor/uplot/uPlot.iife.min.js': 'uPlot.iife.min.js',
      '/vendor/uplot/uPlot.min.css': 'uPlot.min.css',
    };
    const name = files[p];
    if (!name) throw new HttpProblem(404, `no file ${p}; /vendor/ has ${Object.keys(files).join(' and ')}`);
    if (!this.vendorDir) throw new HttpProblem(404, 'uPlot is not installed: run npm ci');
    await this.file(res, path.join(this.vendorDir, name));
  }

  private async dashboard(res: http.ServerResponse, p: string): Promise<void> {
    let rel = p === '/' || p === '/dashboard' || p === '/dashboard/' ? 'index.html' : p.startsWith('/dashboard/') ? p.slice('/dashboard/'.length) : p.slice(1);
    try {
      rel = decodeURIComponent(rel);
    } catch {
      throw bad('malformed percent-encoding in the path');
    }
    const notFound = new HttpProblem(404, `no file ${p}; the dashboard is at /`);
    if (rel.includes('\0')) throw notFound;
    const root = this.dashboardDir;
    const full = path.resolve(root, rel);
    if (!full.startsWith(root + path.sep)) throw notFound; // ../ and absolute paths
    if (rel === 'index.html' && !fs.existsSync(full)) {
      res.writeHead(200, { 'Content-Type': CONTENT_TYPES['.html'], 'Cache-Control': 'no-cache' });
      res.end(PLACEHOLDER);
      return;
    }
    // Symbolic links must not lead out of the folder either.
    let real: string;
    try {
      real = await fs.promises.realpath(full);
    } catch {
      throw notFound;
    }
    const realRoot = await fs.promises.realpath(root).catch(() => root);
    if (!real.startsWith(realRoot + path.sep)) throw notFound;
    await this.file(res, real, notFound);
  }

  private async file(res: http.ServerResponse, file: string, notFound = new HttpProblem(404, 'no such file')): Promise<void> {
    let data: Buffer;
    try {
      const st = await fs.promises.stat(file);
      if (!st.isFile() || st.size > 32 * 1024 * 1024) throw notFound;
      data = await fs.promises.readFile(file);
    } catch (e) {
      if (e instanceof HttpProblem) throw e;
      throw notFound;
    }
    res.writeHead(200, {
      'Content-Type': CONTENT_TYPES[path.extname(file).toLowerCase()] ?? 'application/octet-stream',
      'Content-Length': data.length,
      'Cache-Control': 'no-cache',
      'X-Content-Type-Options': 'nosniff',
    });
    res.end(data);
  }

  // ---- metrics --------------------------------------------------------------------

  private totals(): Record<CounterKey, number> {
    const sum = { ...this.retired };
    for (const c of this.known) for (const k of SUMMED) sum[k] += c.counters[k];
    return sum;
  }

  private setupMetrics(): void {
    const registers = [this.registry];
    prom.collectDefaultMetrics({ register: this.registry });
    const server = this.server;
    new prom.Gauge({
      name: 'tether_connections',
      help: 'Devices (Connections) by link state',
      labelNames: ['state'],
      registers,
      collect() {
        let up = 0;
        let down = 0;
        for (const c of server.connections()) {
          if (c.state === 'up') up++;
          else if (c.state === 'down') down++;
        }
        this.set({ state: 'up' }, up);
        this.set({ state: 'down' }, down);
      },
    });
    const totals = () => this.totals();
    const counter = (name: string, help: string, labelNames: string[], values: () => Array<[Record<string, string>, number]>) =>
      new prom.Counter({
        name,
        help,
        labelNames,
        registers,
        collect() {
          this.reset();
          for (const [labels, v] of values()) this.inc(labels, v);
        },
      });
    counter('tether_connects_total', 'Times a device link came up', [], () => [[{}, totals().connects]]);
    counter('tether_outages_total', 'Times an up device link was lost', [], () => [[{}, totals().outages]]);
    counter('tether_messages_total', 'Messages received from (in) and sent to (out) devices, first transmissions', ['dir'], () => {
      const s = totals();
      return [[{ dir: 'in' }, s.messagesIn], [{ dir: 'out' }, s.messagesOut]];
    });
    counter('tether_retransmits_total', 'qos messages sent again after a timeout or an outage', [], () => [[{}, totals().retransmits]]);
    counter('tether_duplicates_dropped_total', 'Received messages recognised as repeats (ACKed, not delivered)', [], () => [[{}, totals().duplicatesDropped]]);
    counter('tether_bytes_total', 'Bytes received from (in) and sent to (out) devices', ['dir'], () => {
      const s = totals();
      return [[{ dir: 'in' }, s.bytesIn], [{ dir: 'out' }, s.bytesOut]];
    });
    counter('tether_bad_lines_total', 'Received lines that were neither keepalive, ACK nor message', [], () => [[{}, totals().badLines]]);
    counter('tether_limit_hits_total', 'Times a limit turned something away, by limit (see docs/security.md)', ['limit'], () => {
      const s = totals();
      return [
        ...LIMIT_NAMES.map((n): [Record<string, string>, number] => [{ limit: n }, server.limits[n]]),
        ...HTTP_LIMIT_NAMES.map((n): [Record<string, string>, number] => [{ limit: n }, this.limits[n]]),
        [{ limit: 'maxLineLength' }, s.longLines],
        [{ limit: 'rxBuffer' }, s.shed],
      ];
    });
    new prom.Gauge({
      name: 'tether_open_connections',
      help: 'Device sockets open now (TCP and TLS, handshaking or attached), as maxConnections counts them',
      registers,
      collect() {
        this.set(server.openConnections);
      },
    });
    // prom-client calls collect() with the metric as `this`: the API is reached through this name.
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const api = this;
    new prom.Gauge({
      name: 'tether_http_open_connections',
      help: 'HTTP and WebSocket sockets open now, as http.maxConnections counts them',
      registers,
      collect() {
        this.set(api.openSockets);
      },
    });
    new prom.Gauge({
      name: 'tether_blocked_addresses',
      help: 'Source addresses refused right now after repeated authentication failures',
      registers,
      collect() {
        this.set(server.blockedAddresses);
      },
    });
    const bridge = this.bridge;
    if (bridge) {
      new prom.Gauge({
        name: 'tether_bridge_connected',
        help: '1 while the MQTT bridge is connected to its broker',
        registers,
        collect() {
          this.set(bridge.connected ? 1 : 0);
        },
      });
      new prom.Gauge({
        name: 'tether_bridge_queued',
        help: 'Device lines handed to the broker and not yet acknowledged by it (their devices are not ACKed yet); bounded by mqtt.maxQueue',
        registers,
        collect() {
          this.set(bridge.stats.queued);
        },
      });
      counter('tether_bridge_messages_total', 'Lines through the bridge: up = published and acknowledged by the broker, down = delivered to a device (ACKed)', ['dir'], () => [
        [{ dir: 'up' }, bridge.stats.published],
        [{ dir: 'down' }, bridge.stats.downDelivered],
      ]);
      counter('tether_bridge_refused_total', 'Device lines refused without ACK because the bridge queue was full (the devices resend them)', [], () => [[{}, bridge.stats.refused]]);
      counter('tether_bridge_broker_connects_total', 'Times the bridge connected to the broker', [], () => [[{}, bridge.stats.brokerConnects]]);
    }
    counter('tether_handshakes_rejected_total', 'Links turned away before reaching a device, by reason (closedEarly: closed before its ID line)', ['reason'], () =>
      REJECTIONS.map((r) => [{ reason: r }, server.handshakes[r]]),
    );
    counter('tether_stalls_total', 'Times a device was reported stalled: its receive buffer full and nothing read for stallAfter ms', [], () => [[{}, totals().stalls]]);
    new prom.Gauge({
      name: 'tether_devices_stalled',
      help: 'Devices stalled now: nobody is reading their lines (their receive buffer is full)',
      registers,
      collect() {
        let n = 0;
        for (const c of server.connections()) if (c.stalled) n++;
        this.set(n);
      },
    });
    new prom.Gauge({
      name: 'tether_device_rx_buffered',
      help: 'Per device with lines waiting: received lines waiting for the app (kind=buffered, ACKed) and held un-ACKed behind them (kind=held)',
      labelNames: ['id', 'kind'],
      registers,
      collect() {
        this.reset();
        for (const c of server.connections()) {
          if (c.buffered > 0) this.set({ id: c.id, kind: 'buffered' }, c.buffered);
          if (c.heldMessages > 0) this.set({ id: c.id, kind: 'held' }, c.heldMessages);
        }
      },
    });
    counter('tether_app_failures_total', 'App instance failures (throws, rejections, errors of their own tasks), by app', ['app'], () =>
      [...(api.apps?.failures ?? new Map<string, number>())].map(([app, n]) => [{ app }, n]),
    );
    new prom.Gauge({
      name: 'tether_app_instances',
      help: 'App instances by state (running, restarting after a failure, finished, stopped)',
      labelNames: ['state'],
      registers,
      collect() {
        const n = api.apps?.counts();
        if (n) for (const [state, v] of Object.entries(n)) this.set({ state }, v);
      },
    });
    counter('tether_uncaught_errors_total', 'Errors that escaped outside any app instance (logged; the server carried on)', [], () => [[{}, uncaughtErrors()]]);
  }

  /** Used by `tether serve`: app failures and instance states go into /metrics. */
  setApps(apps: AppRunner): void {
    this.apps = apps;
  }

  // ---- WebSocket ------------------------------------------------------------------

  private upgrade(req: http.IncomingMessage, socket: Socket, head: Buffer): void {
    socket.on('error', () => {});
    const refuse = (status: number, reason: string, error: string, headers = '') => {
      const body = JSON.stringify({ error });
      socket.end(
        `HTTP/1.1 ${status} ${reason}\r\nConnection: close\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\n${headers}\r\n${body}`,
      );
    };
    // An upgraded socket is never idle in the HTTP sense: it is not closed to make room (maxBrowsers bounds them).
    const tcp = this.tcpOf(socket);
    if (tcp) this.idle.delete(tcp);
    const address = socket.remoteAddress ?? '?';
    const t0 = performance.now();
    const watch = new Stopwatch();
    try {
      this.admit(req.headers.host, address, t0);
    } catch (e) {
      const p = e as HttpProblem;
      const reasons: Record<number, string> = { 421: 'Misdirected Request', 429: 'Too Many Requests', 503: 'Service Unavailable' };
      return refuse(
        p.status,
        reasons[p.status] ?? 'Refused',
        p.message,
        Object.entries(p.headers)
          .filter(([k]) => k !== 'Connection')
          .map(([k, v]) => `${k}: ${v}\r\n`)
          .join(''),
      );
    } finally {
      this.charge(address, watch.ms());
    }
    let p: string;
    try {
      p = new URL(req.url ?? '/', 'http://localhost').pathname;
    } catch {
      return refuse(400, 'Bad Request', 'malformed request URL');
    }
    if (this.closed) return refuse(503, 'Service Unavailable', 'the server is shutting down');
    if (p !== '/ws') return refuse(404, 'Not Found', `no WebSocket at ${p}; it is at /ws`);
    // A page from another site must not read the fleet through the visitor's browser.
    const origin = req.headers.origin;
    if (origin !== undefined) {
      let host: string | null = null;
      try {
        host = new URL(origin).host;
      } catch {
        /* refused below */
      }
      if (host !== req.headers.host) return refuse(403, 'Forbidden', `WebSocket from origin ${origin} refused: open the dashboard from this server (${req.headers.host})`);
    }
    if (this.browsers.size >= this.maxBrowsers) {
      this.log.warn('WebSocket refused: too many browsers', { max: this.maxBrowsers, remote: socket.remoteAddress });
      return refuse(503, 'Service Unavailable', `${this.maxBrowsers} browsers are connected already; close one and retry`);
    }
    this.wss.handleUpgrade(req, socket, head, (ws) => this.onBrowser(ws, `${socket.remoteAddress}:${socket.remotePort}`, address));
  }

  private onBrowser(ws: WebSocket, remote: string, address: string): void {
    const b: Browser = {
      ws,
      remote,
      address,
      filter: { ...DEFAULT_FILTER },
      selected: null,
      shown: new Set(),
      complete: false,
      total: 0,
      sentTotal: 0,
      countedAt: 0,
      countStale: false,
      changed: new Set(),
      timer: null,
      lastUpdate: 0,
      want: null,
      workTimer: null,
      working: false,
      filterGen: 0,
      counting: false,
      lastInit: -Infinity,
      messages: new TokenBucket(BROWSER_MESSAGES.perSecond / 1000, BROWSER_MESSAGES.burst, performance.now()),
      resumeTimer: null,
      alive: true,
    };
    this.browsers.add(b);
    this.log.debug('browser connected', { remote });
    ws.on('message', (data, isBinary) => this.onBrowserMessage(b, data as Buffer | Buffer[] | ArrayBuffer, isBinary));
    ws.on('pong', () => (b.alive = true));
    ws.on('error', (e) => this.log.debug('browser socket error', { remote, error: e.message }));
    ws.on('close', (code) => {
      this.browsers.delete(b);
      this.stopBrowser(b);
      this.log.debug('browser disconnected', { remote, code });
    });
    this.ask(b, 'init');
  }

  private stopBrowser(b: Browser): void {
    for (const t of [b.timer, b.workTimer, b.resumeTimer]) if (t) clearTimeout(t);
    b.timer = b.workTimer = b.resumeTimer = null;
    b.want = null;
  }

  /**
   * Message rate and budget of one browser: past BROWSER_MESSAGES, or while its
   * address owes event-loop time, its socket is paused (the kernel's buffers fill,
   * TCP slows the sender) until it may go on.
   */
  private meter(b: Browser): boolean {
    const now = performance.now();
    b.messages.take(1, now);
    if (b.messages.tokens(now) < -FLOOD_DEBT) {
      // Far past its rate (what was already read before the pause took hold): not a dashboard. Its slot is freed.
      this.hit('httpLoad', 'browser dropped: it floods the server with messages', {
        remote: b.remote,
        hint: `a dashboard sends a few messages a second; at most ${BROWSER_MESSAGES.perSecond}/s are read from one browser`,
      });
      b.ws.terminate();
      return false;
    }
    const wait = Math.max(b.messages.waitFor(0, now), this.budget.wait(b.address, now).ms);
    if (wait <= 0 || b.resumeTimer) return true;
    this.hit('httpLoad', 'browser paused: too many messages, or over its share of the server time', {
      remote: b.remote,
      pausedMs: Math.ceil(wait),
      hint: `a dashboard sends a few messages a second; at most ${BROWSER_MESSAGES.perSecond}/s are read from one browser`,
    });
    b.ws.pause();
    b.resumeTimer = setTimeout(() => {
      b.resumeTimer = null;
      if (b.ws.readyState === WebSocket.OPEN) b.ws.resume();
    }, Math.ceil(wait));
    b.resumeTimer.unref();
    return true;
  }

  private onBrowserMessage(b: Browser, data: Buffer | Buffer[] | ArrayBuffer, isBinary: boolean): void {
    if (b.ws.readyState !== WebSocket.OPEN) return; // dropped: what it had sent before is not read
    const watch = new Stopwatch();
    if (!this.meter(b)) return;
    let then: 'init' | 'page' | null = null;
    try {
      const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data as ArrayBuffer);
      if (isBinary) throw bad('send text frames with JSON, not binary');
      if (buf.length > MAX_WS_MESSAGE) throw bad(`message of ${buf.length} bytes; the limit is ${MAX_WS_MESSAGE}`);
      let raw: unknown;
      try {
        raw = JSON.parse(buf.toString('utf8'));
      } catch (e) {
        throw bad(`not valid JSON (${(e as Error).message}); send {"t": "FILT", …}, {"t": "MORE"} or {"t": "SEL", "id": "…"}`);
      }
      const m = validate.wsMessage(raw, b.filter);
      if (m.t === 'FILT') {
        // Only the filter changes now; the INIT follows (one for a burst of FILTs, with the last filter).
        b.filter = m.filter;
        b.filterGen++;
        then = 'init';
      } else if (m.t === 'MORE') {
        then = 'page';
      } else {
        b.selected = m.id;
      }
    } catch (e) {
      const error = e instanceof HttpProblem ? e.message : 'internal error (logged on the server)';
      if (!(e instanceof HttpProblem)) this.log.error('WebSocket message failed', { error: (e as Error).stack ?? String(e) });
      this.sendTo(b, { t: 'ERR', error });
    }
    this.charge(b.address, watch.ms());
    if (then) this.ask(b, then);
  }

  /** A browser asks for an INIT (after FILT, or on connecting) or for its next PAGE (MORE); the work is coalesced and budgeted. */
  private ask(b: Browser, what: 'init' | 'page'): void {
    if (what === 'init') b.want = 'init'; // an INIT also answers a MORE still waiting
    else if (b.want === null) b.want = 'page';
    else return;
    this.scheduleWork(b);
  }

  private scheduleWork(b: Browser): void {
    if (b.workTimer || b.working || b.want === null || this.closed) return;
    const gap = b.want === 'init' ? b.lastInit + INIT_INTERVAL - Date.now() : 0;
    const wait = Math.max(gap, this.budget.wait(b.address, performance.now()).ms);
    if (wait <= 0) {
      void this.doWork(b);
      return;
    }
    b.workTimer = setTimeout(() => {
      b.workTimer = null;
      void this.doWork(b);
    }, Math.ceil(wait));
    b.workTimer.unref();
  }

  private async doWork(b: Browser): Promise<void> {
    if (b.ws.readyState !== WebSocket.OPEN || b.want === null || b.working) return;
    if (this.budget.wait(b.address, performance.now()).ms > 0 || (b.want === 'init' && Date.now() < b.lastInit + INIT_INTERVAL)) {
      this.scheduleWork(b);
      return;
    }
    const what = b.want;
    b.want = null;
    b.working = true;
    try {
      if (what === 'init') await this.sendInit(b);
      else await this.sendPage(b);
    } catch (e) {
      if (!(e instanceof HttpProblem)) this.log.error('WebSocket page failed', { remote: b.remote, error: (e as Error).stack ?? String(e) });
    } finally {
      b.working = false;
    }
    this.scheduleWork(b); // a FILT or MORE that came meanwhile
  }

  /** The light row a page is selected from. */
  private rowOf(c: Connection): Row {
    return { conn: c, id: c.id, type: this.fleet.typeOf(c), meta: c.meta, status: c.state, lastSeen: c.lastSeen || null, counters: c.counters };
  }

  /**
   * Runs `each` over every Connection, 256 at a time, as steps of the work queue
   * charged to `address`: the device links are served between turns, and while
   * this client (or all of them) owes time its steps wait. A fleet of 100,000
   * costs a request more time, never a stall, and never more than its share.
   */
  private sweep(address: string, each: (c: Connection) => void): Promise<void> {
    const conns = this.server.connections();
    let i = 0;
    return new Promise<void>((resolve, reject) =>
      this.work.add(() => {
        const held = this.gate(address, reject);
        if (held !== null) return held;
        const watch = new Stopwatch();
        try {
          const stop = Math.min(conns.length, i + 256);
          for (; i < stop; i++) each(conns[i]);
        } catch (e) {
          reject(e);
          return 'done';
        } finally {
          this.charge(address, watch.ms());
        }
        if (i < conns.length) return 'more';
        resolve();
        return 'done';
      }),
    );
  }

  /** Before a step of the work queue: 'done' (rejected) while shutting down, the ms `address` still owes, or null to go on. */
  private gate(address: string, reject: (e: Error) => void): 'done' | number | null {
    if (this.closed) {
      reject(new HttpProblem(503, 'the server is shutting down'));
      return 'done';
    }
    const owed = this.budget.wait(address, performance.now()).ms;
    return owed > 0 ? owed : null;
  }

  /** Runs `fn` as one step of the work queue (once `address` owes no time), charged to it. */
  private task<T>(address: string, fn: () => T): Promise<T> {
    return new Promise<T>((resolve, reject) =>
      this.work.add(() => {
        const held = this.gate(address, reject);
        if (held !== null) return held;
        try {
          resolve(this.timed(address, fn));
        } catch (e) {
          reject(e);
        }
        return 'done';
      }),
    );
  }

  /**
   * One page of the devices matching `f`, in its order, leaving out `exclude`,
   * without describing or sorting every device (a bounded heap, fed in slices).
   * `total`: devices matching `f`; `rest`: matching, not excluded, after this page.
   */
  private async pick(address: string, f: Filter, offset: number, limit: number, exclude: Set<string> | null = null): Promise<{ rows: Row[]; total: number; rest: number }> {
    const top = new TopK<Row>(compareDevices(f), offset, limit);
    let total = 0;
    await this.sweep(address, (c) => {
      const r = this.rowOf(c);
      if (!matchesFilter(r, f)) return;
      total++;
      if (exclude === null || !exclude.has(r.id)) top.add(r);
    });
    const rows = top.page();
    return { rows, total, rest: Math.max(0, top.kept - offset - rows.length) };
  }

  /** Devices matching `f`. */
  private async count(address: string, f: Filter): Promise<number> {
    let n = 0;
    await this.sweep(address, (c) => {
      if (matchesFilter(this.rowOf(c), f)) n++;
    });
    return n;
  }

  /** The DeviceInfo JSON of `rows`, in order, until PAGE_BYTES (at least one). */
  private pageJson(rows: Row[]): { parts: string[]; ids: string[] } {
    const parts: string[] = [];
    const ids: string[] = [];
    let bytes = 0;
    for (const r of rows) {
      const j = JSON.stringify(this.fleet.describe(r.conn));
      const n = Buffer.byteLength(j) + 1;
      if (parts.length > 0 && bytes + n > PAGE_BYTES) break;
      parts.push(j);
      ids.push(r.id);
      bytes += n;
    }
    return { parts, ids };
  }

  /** INIT: the first page of devices matching the browser's filter, how many match, and whether that is all of them. */
  private async sendInit(b: Browser): Promise<void> {
    const gen = b.filterGen;
    b.lastInit = Date.now();
    const { rows, total, rest } = await this.pick(b.address, b.filter, 0, this.limitOptions.pageSize);
    await this.task(b.address, () => {
      if (gen !== b.filterGen || b.ws.readyState !== WebSocket.OPEN) return; // a newer FILT: its INIT follows
      const { parts, ids } = this.pageJson(rows);
      b.shown = new Set(ids);
      b.changed.clear();
      if (b.timer) clearTimeout(b.timer);
      b.timer = null;
      b.complete = rest + rows.length - ids.length === 0;
      b.total = b.sentTotal = total;
      b.countedAt = Date.now();
      b.countStale = false;
      this.sendRaw(b, `{"t":"INIT","devices":[${parts.join(',')}],"filter":${JSON.stringify(b.filter)},"total":${total},"complete":${b.complete}}`);
    });
  }

  /** PAGE: the next devices matching the filter that this browser has not been sent, in order. */
  private async sendPage(b: Browser): Promise<void> {
    if (b.complete) {
      this.sendRaw(b, `{"t":"PAGE","devices":[],"total":${b.total},"complete":true}`);
      return;
    }
    const gen = b.filterGen;
    const { rows, total, rest } = await this.pick(b.address, b.filter, 0, this.limitOptions.pageSize, b.shown);
    await this.task(b.address, () => {
      if (gen !== b.filterGen || b.ws.readyState !== WebSocket.OPEN) return; // a FILT came: the INIT answers instead
      const fresh = rows.filter((r) => !b.shown.has(r.id)); // shown meanwhile by an UPDT
      const { parts, ids } = this.pageJson(fresh);
      for (const id of ids) b.shown.add(id);
      b.complete = rest + fresh.length - ids.length === 0;
      b.total = b.sentTotal = total;
      b.countedAt = Date.now();
      b.countStale = false;
      this.sendRaw(b, `{"t":"PAGE","devices":[${parts.join(',')}],"total":${total},"complete":${b.complete}}`);
    });
  }

  /** A fresh count of the devices matching a browser's filter (it has not been sent them all), then an UPDT if it moved. */
  private async recount(b: Browser): Promise<void> {
    if (b.counting) return;
    b.counting = true;
    b.countStale = false;
    b.countedAt = Date.now();
    const gen = b.filterGen;
    try {
      const n = await this.count(b.address, b.filter);
      if (gen !== b.filterGen || b.complete) return;
      b.total = n;
      if (b.total !== b.sentTotal) this.scheduleFlush(b, Date.now());
    } catch (e) {
      if (!(e instanceof HttpProblem)) this.log.error('WebSocket count failed', { remote: b.remote, error: (e as Error).stack ?? String(e) });
    } finally {
      b.counting = false;
    }
  }

  private changed(id: string): void {
    const now = Date.now();
    for (const b of this.browsers) {
      if (!b.complete && !b.shown.has(id)) {
        // Not on this browser's pages: it only moves the count, refreshed now and then.
        if (!b.countStale) {
          b.countStale = true;
          this.scheduleFlush(b, now);
        }
        continue;
      }
      b.changed.add(id);
      this.scheduleFlush(b, now);
    }
  }

  private scheduleFlush(b: Browser, now: number): void {
    if (b.timer) return;
    const countOnly = b.changed.size === 0 && b.total === b.sentTotal;
    const at = countOnly ? Math.max(b.lastUpdate + UPDT_INTERVAL, b.countedAt + COUNT_INTERVAL) : b.lastUpdate + UPDT_INTERVAL;
    b.timer = setTimeout(() => this.queueFlush(b), Math.max(0, at - now));
    b.timer.unref();
  }

  /**
   * One UPDT: changed devices that match the filter (at most a page of them; the
   * rest go with the next), `removed`: IDs shown before that no longer match, and
   * `total` when the count of matching devices changed.
   */
  private queueFlush(b: Browser): void {
    // b.timer stays set until the flush has run: changes meanwhile join this UPDT.
    void this.task(b.address, () => {
      b.timer = null;
      this.flush(b);
    }).catch(() => {});
  }

  private flush(b: Browser): void {
    if (b.ws.readyState !== WebSocket.OPEN) return;
    const now = Date.now();
    const infos: DeviceInfo[] = [];
    const removed: string[] = [];
    for (const id of b.changed) {
      if (infos.length >= this.limitOptions.pageSize) break;
      b.changed.delete(id);
      const c = this.server.get(id);
      const d = c ? this.fleet.describe(c) : undefined;
      if (d && matchesFilter(d, b.filter)) {
        if (b.complete || b.shown.has(id)) infos.push(d);
      } else if (b.shown.delete(id)) {
        removed.push(id);
        if (!b.complete) b.countStale = true;
      }
    }
    infos.sort(compareDevices(b.filter));
    const parts: string[] = [];
    let bytes = 0;
    for (const d of infos) {
      const j = JSON.stringify(d);
      const n = Buffer.byteLength(j) + 1;
      if (parts.length > 0 && bytes + n > PAGE_BYTES) {
        b.changed.add(d.id); // with the next UPDT
        continue;
      }
      parts.push(j);
      bytes += n;
      b.shown.add(d.id);
    }
    if (b.complete) b.total = b.shown.size;
    else if (b.countStale && now - b.countedAt >= COUNT_INTERVAL) void this.recount(b);
    if (parts.length > 0 || removed.length > 0 || b.total !== b.sentTotal) {
      b.lastUpdate = now;
      let msg = `{"t":"UPDT","devices":[${parts.join(',')}]`;
      if (removed.length > 0) msg += `,"removed":${JSON.stringify(removed)}`;
      if (b.total !== b.sentTotal) msg += `,"total":${b.total}`;
      b.sentTotal = b.total;
      this.sendRaw(b, msg + '}');
    }
    if (b.changed.size > 0 || (!b.complete && b.countStale)) this.scheduleFlush(b, now);
  }

  private sendTo(b: Browser, msg: object): void {
    this.sendRaw(b, JSON.stringify(msg));
  }

  private sendRaw(b: Browser, text: string): void {
    if (b.ws.readyState !== WebSocket.OPEN) return;
    if (b.ws.bufferedAmount > this.maxBrowserQueue) {
      this.log.warn('browser dropped: it reads too slowly', { remote: b.remote, queued: b.ws.bufferedAmount, max: this.maxBrowserQueue });
      b.ws.terminate();
      return;
    }
    b.ws.send(text);
  }

  private ping(): void {
    for (const b of this.browsers) {
      if (!b.alive) {
        this.log.info('browser dropped: no answer to a ping', { remote: b.remote });
        b.ws.terminate();
        continue;
      }
      b.alive = false;
      b.ws.ping();
    }
  }
}

function noQuery(url: URL): void {
  if ([...url.searchParams.keys()].length > 0) throw bad(`${url.pathname} takes no query parameters`);
}
