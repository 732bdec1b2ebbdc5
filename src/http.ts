/**
 * The fleet over HTTP: a JSON API, a WebSocket feed for the dashboard, Prometheus
 * metrics and the dashboard's static files, all on one Node `http` server.
 *
 *   GET  /api/devices[?type=&status=&q=&sort=&dir=]    devices, filtered and sorted
 *   GET  /api/devices/:id                               one device, its recent lines and telemetry
 *   GET  /api/devices/:id/telemetry/:name[?from=&to=]   samples of one telemetry name
 *   POST /api/devices/:id/messages                      send one line to a device
 *   POST /api/broadcast                                 send one line to a type or to everyone
 *   GET  /metrics                                       Prometheus text
 *   GET  /ws                                            WebSocket (INIT / UPDT / MSG; FILT / SEL)
 *   GET  /, /dashboard/…, /vendor/uplot/…               the dashboard
 *
 * It uses only the public surfaces of Server, Connection and Fleet.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import * as path from 'node:path';
import * as prom from 'prom-client';
import { WebSocket, WebSocketServer } from 'ws';
import type { MqttBridge } from './bridge';
import type { Connection } from './connection';
import { ENDPOINT_DEFAULTS } from './endpoint';
import { TetherError } from './errors';
import type { Counters } from './endpoint';
import { LIMIT_NAMES } from './limits';
import { FleetBusyError } from './fleet';
import type { DeviceInfo, Fleet, SendOutcome } from './fleet';
import { silentLogger } from './log';
import type { Logger } from './log';
import { payloadProblem } from './protocol/lines';
import type { HandshakeStats, Server } from './server';
import type { Sample } from './telemetry';

// ---- options and limits -------------------------------------------------------

export interface HttpApiOptions {
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
/** A body is read (and thrown away) up to this size to answer 400 cleanly; beyond it the socket is cut. */
const MAX_DRAIN = 16 * 1024 * 1024;

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

export function matchesFilter(d: DeviceInfo, f: Filter): boolean {
  if (f.type !== null && d.type !== f.type) return false;
  if (f.status !== null && d.status !== f.status) return false;
  if (f.q) {
    const q = f.q.toLowerCase();
    if (!d.id.toLowerCase().includes(q) && !(d.type ?? '').toLowerCase().includes(q) && !JSON.stringify(d.meta).toLowerCase().includes(q)) {
      return false;
    }
  }
  return true;
}

const collator = new Intl.Collator('en', { numeric: true });
const STATUS_RANK: Record<DeviceInfo['status'], number> = { up: 0, down: 1, closed: 2 };
const SORT_KEY: Record<SortField, (d: DeviceInfo) => string | number | null> = {
  id: (d) => d.id,
  type: (d) => d.type,
  status: (d) => STATUS_RANK[d.status],
  lastSeen: (d) => d.lastSeen,
  outages: (d) => d.counters.outages,
  messages: (d) => d.counters.messagesIn + d.counters.messagesOut,
};

/** Orders by the filter's field and direction; missing values (no type, never seen) last; ties by ID. */
export function compareDevices(f: Filter): (a: DeviceInfo, b: DeviceInfo) => number {
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

export function selectDevices(all: DeviceInfo[], f: Filter): DeviceInfo[] {
  return all.filter((d) => matchesFilter(d, f)).sort(compareDevices(f));
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
    const known = ['type', 'status', 'q', 'sort', 'dir'];
    const seen = new Set<string>();
    for (const k of params.keys()) {
      if (!known.includes(k)) throw bad(`unknown query parameter ${JSON.stringify(k)}; use type, status (up|down), q, sort (${sortList}), dir (asc|desc)`);
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
  wsMessage(raw: unknown, current: Filter): { t: 'FILT'; filter: Filter } | { t: 'SEL'; id: string | null } {
    if (!plain(raw)) throw bad('send a JSON object: {"t": "FILT", …} or {"t": "SEL", "id": "…"}');
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
    throw bad(`unknown message type ${JSON.stringify(raw.t)}; send "t": "FILT" or "t": "SEL"`);
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

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host.startsWith('127.');
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
  filter: Filter;
  selected: string | null;
  /** IDs this browser was last told about (INIT or UPDT) as matching its filter. */
  shown: Set<string>;
  /** IDs changed since the last UPDT. */
  changed: Set<string>;
  timer: NodeJS.Timeout | null;
  lastUpdate: number;
  alive: boolean;
}

type CounterKey = keyof Counters;
const SUMMED: CounterKey[] = ['connects', 'outages', 'messagesIn', 'messagesOut', 'retransmits', 'duplicatesDropped', 'bytesIn', 'bytesOut', 'badLines', 'longLines', 'shed'];
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

  constructor(opts: HttpApiOptions) {
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

    if (!this.token && !isLoopback(this.host)) {
      this.log.warn('the HTTP API will listen beyond this machine without a token: anyone who reaches it can send lines to devices', {
        host: this.host,
        hint: 'set "token" in the "http" section, or "host": "127.0.0.1"',
      });
    }
    const handler = (req: http.IncomingMessage, res: http.ServerResponse) => void this.handle(req, res);
    this.secure = !!opts.tls;
    this.bridge = opts.bridge ?? null;
    if (opts.tls) {
      const read = (what: string, file: string) => {
        try {
          return fs.readFileSync(file);
        } catch (e) {
          throw new TetherError('ERR_BAD_CONFIG', `http.tls.${what}: cannot read ${file} (${(e as NodeJS.ErrnoException).code ?? e}): check the path`);
        }
      };
      this.http = https.createServer({ key: read('key', opts.tls.key), cert: read('cert', opts.tls.cert) }, handler);
    } else {
      this.http = http.createServer(handler);
    }
    this.http.on('upgrade', (req, socket, head) => this.upgrade(req, socket as Socket, head));
    this.wss = new WebSocketServer({ noServer: true, maxPayload: 4 * MAX_WS_MESSAGE });

    // Feeds: recent lines and MSG per Connection, UPDT from the fleet's events.
    for (const c of this.server.connections()) this.watch(c);
    const onConnection = (c: Connection) => this.watch(c);
    this.server.on('connection', onConnection);
    this.detach.push(() => this.server.off('connection', onConnection));
    for (const ev of ['connect', 'disconnect', 'message', 'telemetry']) {
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
      if (b.timer) clearTimeout(b.timer);
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

  // ---- HTTP -----------------------------------------------------------------------

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    req.on('error', () => {});
    res.on('error', () => {});
    try {
      await this.route(req, res);
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

  private async route(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
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
        return this.json(res, 200, { devices: selectDevices(this.fleet.list(), f) });
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
        return this.sendOne(res, seg[1], body);
      }
      if (seg.length === 1 && seg[0] === 'broadcast') {
        allow('POST');
        this.authorize(req);
        noQuery(url);
        const body = validate.sendBody(await this.readJson(req), true, this.maxLineLength);
        return this.broadcast(res, body);
      }
      throw new HttpProblem(
        404,
        `no API endpoint ${method} ${p}; there are GET /api/devices, GET /api/devices/:id, GET /api/devices/:id/telemetry/:name, ` +
          'POST /api/devices/:id/messages, POST /api/broadcast (IDs URL-encoded)',
      );
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
    const declared = Number(req.headers['content-length']);
    if (declared > MAX_DRAIN) {
      req.destroy();
      throw new HttpProblem(400, `the body is ${declared} bytes; the limit is ${MAX_BODY} bytes`, { Connection: 'close' });
    }
    const chunks: Buffer[] = [];
    let size = 0;
    await new Promise<void>((resolve, reject) => {
      req.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size <= MAX_BODY) chunks.push(chunk);
        else if (size > MAX_DRAIN) {
          req.destroy();
          reject(new HttpProblem(400, `the body is over ${MAX_BODY} bytes; send less`));
        }
      });
      req.on('end', () => resolve());
      req.on('error', (e) => reject(e));
      req.on('close', () => resolve());
    });
    if (size > MAX_BODY) throw bad(`the body is ${size} bytes; the limit is ${MAX_BODY} bytes (64 KiB): send a shorter line`);
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

  private async sendOne(res: http.ServerResponse, id: string, body: { line: string; timeout: number; accepted: boolean }): Promise<void> {
    const outcome = await this.withSendSlot(() => this.fleet.send(id, body.line, { timeout: body.timeout, accepted: body.accepted }));
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

  private async broadcast(res: http.ServerResponse, body: { line: string; type?: string; timeout: number; accepted: boolean }): Promise<void> {
    const opts = { timeout: body.timeout, accepted: body.accepted };
    const outcomes: SendOutcome[] = await this.withSendSlot(() =>
      (body.type !== undefined ? this.fleet.sendType(body.type, body.line, opts) : this.fleet.sendAll(body.line, opts)).catch((e: unknown) => {
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
  }

  // ---- WebSocket ------------------------------------------------------------------

  private upgrade(req: http.IncomingMessage, socket: Socket, head: Buffer): void {
    socket.on('error', () => {});
    const refuse = (status: number, reason: string, error: string) => {
      const body = JSON.stringify({ error });
      socket.end(
        `HTTP/1.1 ${status} ${reason}\r\nConnection: close\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
      );
    };
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
    this.wss.handleUpgrade(req, socket, head, (ws) => this.onBrowser(ws, `${socket.remoteAddress}:${socket.remotePort}`));
  }

  private onBrowser(ws: WebSocket, remote: string): void {
    const b: Browser = {
      ws,
      remote,
      filter: { ...DEFAULT_FILTER },
      selected: null,
      shown: new Set(),
      changed: new Set(),
      timer: null,
      lastUpdate: 0,
      alive: true,
    };
    this.browsers.add(b);
    this.log.debug('browser connected', { remote });
    ws.on('message', (data, isBinary) => this.onBrowserMessage(b, data as Buffer | Buffer[] | ArrayBuffer, isBinary));
    ws.on('pong', () => (b.alive = true));
    ws.on('error', (e) => this.log.debug('browser socket error', { remote, error: e.message }));
    ws.on('close', (code) => {
      this.browsers.delete(b);
      if (b.timer) clearTimeout(b.timer);
      this.log.debug('browser disconnected', { remote, code });
    });
    this.sendInit(b);
  }

  private onBrowserMessage(b: Browser, data: Buffer | Buffer[] | ArrayBuffer, isBinary: boolean): void {
    try {
      const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data as ArrayBuffer);
      if (isBinary) throw bad('send text frames with JSON, not binary');
      if (buf.length > MAX_WS_MESSAGE) throw bad(`message of ${buf.length} bytes; the limit is ${MAX_WS_MESSAGE}`);
      let raw: unknown;
      try {
        raw = JSON.parse(buf.toString('utf8'));
      } catch (e) {
        throw bad(`not valid JSON (${(e as Error).message}); send {"t": "FILT", …} or {"t": "SEL", "id": "…"}`);
      }
      const m = validate.wsMessage(raw, b.filter);
      if (m.t === 'FILT') {
        b.filter = m.filter;
        this.sendInit(b);
      } else {
        b.selected = m.id;
      }
    } catch (e) {
      const error = e instanceof HttpProblem ? e.message : 'internal error (logged on the server)';
      if (!(e instanceof HttpProblem)) this.log.error('WebSocket message failed', { error: (e as Error).stack ?? String(e) });
      this.sendTo(b, { t: 'ERR', error });
    }
  }

  private sendInit(b: Browser): void {
    const devices = selectDevices(this.fleet.list(), b.filter);
    b.shown = new Set(devices.map((d) => d.id));
    b.changed.clear();
    if (b.timer) clearTimeout(b.timer);
    b.timer = null;
    this.sendTo(b, { t: 'INIT', devices, filter: b.filter });
  }

  private changed(id: string): void {
    const now = Date.now();
    for (const b of this.browsers) {
      b.changed.add(id);
      if (!b.timer) {
        b.timer = setTimeout(() => this.flush(b), Math.max(0, b.lastUpdate + UPDT_INTERVAL - now));
        b.timer.unref();
      }
    }
  }

  /** One UPDT with every changed device that matches the filter (and `removed`: IDs shown before that no longer match). */
  private flush(b: Browser): void {
    b.timer = null;
    const devices: DeviceInfo[] = [];
    const removed: string[] = [];
    for (const id of b.changed) {
      const d = this.fleet.info(id);
      if (d && matchesFilter(d, b.filter)) {
        devices.push(d);
        b.shown.add(id);
      } else if (b.shown.delete(id)) removed.push(id);
    }
    b.changed.clear();
    if (devices.length === 0 && removed.length === 0) return;
    b.lastUpdate = Date.now();
    devices.sort(compareDevices(b.filter));
    this.sendTo(b, removed.length > 0 ? { t: 'UPDT', devices, removed } : { t: 'UPDT', devices });
  }

  private sendTo(b: Browser, msg: object): void {
    if (b.ws.readyState !== WebSocket.OPEN) return;
    if (b.ws.bufferedAmount > this.maxBrowserQueue) {
      this.log.warn('browser dropped: it reads too slowly', { remote: b.remote, queued: b.ws.bufferedAmount, max: this.maxBrowserQueue });
      b.ws.terminate();
      return;
    }
    b.ws.send(JSON.stringify(msg));
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
