/**
 * The HTTP API, /metrics, the WebSocket feed and the static files, against a
 * running Server with real Node Clients; requests over real sockets on 127.0.0.1
 * (fetch, node:http for raw paths, ws for the WebSocket).
 */
import test, { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import { WebSocket } from 'ws';
import { Client } from '../src/client';
import { resolveConfig } from '../src/config';
import { Fleet } from '../src/fleet';
import * as net from 'node:net';
import fc from 'fast-check';
import {
  compareDevices,
  DEFAULT_FILTER,
  HostCheck,
  hostOf,
  HttpApi,
  HttpLimitOptions,
  HttpProblem,
  LIST_LIMIT,
  LoadBudget,
  MAX_BODY,
  MAX_PIPELINED,
  RECENT_CHARS,
  resolveHttpLimits,
  selectDevices,
  selectTop,
  TokenBucket,
  UPDT_INTERVAL,
  validate,
} from '../src/http';
import { createLogger, LogRecord, silentLogger } from '../src/log';
import { Server } from '../src/server';
import { RawPeer } from './helpers/raw';
import { waitFor } from './helpers/wait';

const T = 1000;
const TYPES = { lamp: ['lamp-*'], sensor: ['sensor-*'] };

interface Setup {
  server: Server;
  fleet: Fleet;
  api: HttpApi;
  base: string;
  device(idLine: string): Promise<Client>;
  /** Closes a device and waits until the server has seen its link go down. */
  down(id: string, client: Client): Promise<void>;
  /** Reads (and drops) what device `id` sends, as an app would, so it is never held back by the rx buffer. */
  consume(id: string): void;
}

interface StartOptions extends Partial<HttpLimitOptions> {
  token?: string;
  dashboardDir?: string;
  maxBrowserQueue?: number;
  maxLineLength?: number;
  /** Receives the API's log records. */
  sink?: (rec: LogRecord) => void;
}

async function start(t: ExecutionContext, opts: StartOptions = {}): Promise<Setup> {
  const { maxLineLength, sink, ...apiOpts } = opts;
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: T, settleDelay: 0, maxLineLength, idLineTypes: true, logger: silentLogger });
  const fleet = new Fleet(server, TYPES);
  const logger = sink ? createLogger({ level: 'debug', sink }) : silentLogger;
  const api = new HttpApi({ server, fleet, host: '127.0.0.1', port: 0, logger, ...apiOpts });
  await api.listen();
  t.teardown(async () => {
    await api.close();
    await server.close();
  });
  const device = async (idLine: string) => {
    const c = new Client({ id: idLine, port: server.port, timeout: T, retryMin: 100, retryMax: 500 });
    t.teardown(() => c.close());
    await c.connect();
    return c;
  };
  const down = async (id: string, client: Client) => {
    const conn = server.get(id)!;
    client.close();
    await waitFor(`${id} to go down`, () => conn.state === 'down');
  };
  const consume = (id: string) => {
    void (async () => {
      for await (const _ of s.server.get(id)!) void _;
    })().catch(() => {}); // ends with ERR_CLOSED at teardown
  };
  const s = { server, fleet, api, base: api.url.replace(/\/$/, ''), device, down, consume };
  return s;
}

async function get(url: string): Promise<{ status: number; body: any; headers: Headers }> {
  const r = await fetch(url);
  const text = await r.text();
  let body: unknown = text;
  if ((r.headers.get('content-type') ?? '').startsWith('application/json')) body = JSON.parse(text);
  return { status: r.status, body, headers: r.headers };
}

async function post(url: string, body: unknown, headers: Record<string, string> = {}): Promise<{ status: number; body: any; headers: Headers }> {
  const r = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  return { status: r.status, body: await r.json(), headers: r.headers };
}

/** GET with the path sent exactly as written (fetch would normalise ../ and %2e). */
function rawGet(port: number, rawPath: string): Promise<{ status: number; body: string; type: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: rawPath }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode!, body, type: String(res.headers['content-type']) }));
    });
    req.on('error', reject);
  });
}

/** A WebSocket to /ws that records every message it receives. */
class Browser {
  readonly msgs: any[] = [];
  readonly ws: WebSocket;
  readonly opened: Promise<void>;
  readonly closed: Promise<number>;
  constructor(base: string, headers: Record<string, string> = {}) {
    this.ws = new WebSocket(base.replace(/^http/, 'ws') + '/ws', { headers });
    this.ws.on('message', (d) => this.msgs.push(JSON.parse(String(d))));
    this.opened = new Promise((resolve, reject) => {
      this.ws.once('open', () => resolve());
      this.ws.once('error', reject);
    });
    this.closed = new Promise((resolve) => this.ws.once('close', (code) => resolve(code)));
  }
  send(msg: unknown): void {
    this.ws.send(typeof msg === 'string' ? msg : JSON.stringify(msg));
  }
  /** Waits for the next message (after index `from`) that satisfies `pred`. */
  async next(pred: (m: any) => boolean, from = 0, what = 'a WebSocket message'): Promise<any> {
    return waitFor(what, () => this.msgs.slice(from).find(pred));
  }
  close(): void {
    this.ws.terminate();
  }
}

async function browser(t: ExecutionContext, s: Setup, headers?: Record<string, string>): Promise<Browser> {
  const b = new Browser(s.base, headers);
  t.teardown(() => b.close());
  await b.opened;
  return b;
}

/** name{labels} value → number, from Prometheus text; every sample line must parse. */
function parseMetrics(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    // Prometheus reads NaN and Inf in any case (prom-client writes "Nan").
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (-?[0-9.e+-]+|nan|[+-]inf)$/i.exec(line);
    if (!m) throw new Error(`unparsable metrics line: ${line}`);
    out.set(m[1], Number(m[2]));
  }
  return out;
}

// ---- GET /api/devices ---------------------------------------------------------------

test('GET /api/devices lists devices with filters and sorting; bad parameters are 400 with a hint', async (t) => {
  const s = await start(t);
  const l1 = await s.device('lamp-1##lamp##{"room":"Kitchen"}');
  const l2 = await s.device('lamp-2');
  await s.device('sensor-10');
  await s.device('sensor-9##sensor##{"room":"garage"}');
  await s.device('zz-untyped');
  await l1.write('a');
  await l1.write('b');
  await l2.write('c');
  await s.down('lamp-2', l2);

  const ids = async (q: string) => ((await get(`${s.base}/api/devices${q}`)).body.devices as any[]).map((d) => d.id);
  const all = await get(`${s.base}/api/devices`);
  t.is(all.status, 200);
  t.regex(all.headers.get('content-type')!, /^application\/json/);
  t.deepEqual(
    all.body.devices.map((d: any) => d.id),
    ['lamp-1', 'lamp-2', 'sensor-9', 'sensor-10', 'zz-untyped'],
    'sorted by ID, numbers in IDs compared as numbers',
  );
  const d = all.body.devices[0];
  for (const k of ['counters', 'id', 'lastSeen', 'meta', 'remote', 'status', 'telemetry', 'type']) t.true(k in d, `DeviceInfo has ${k}`);
  t.deepEqual(d.meta, { room: 'Kitchen' });

  t.deepEqual(await ids('?type=lamp'), ['lamp-1', 'lamp-2']);
  t.deepEqual(await ids('?status=down'), ['lamp-2']);
  t.deepEqual(await ids('?status=up&type=lamp'), ['lamp-1']);
  t.deepEqual(await ids('?q=kitchen'), ['lamp-1'], 'q looks into the metadata, ignoring case');
  t.deepEqual(await ids('?q=SENSOR'), ['sensor-9', 'sensor-10'], 'and into IDs and types');
  t.deepEqual(await ids('?q=nothing-like-this'), []);
  t.deepEqual(await ids('?sort=id&dir=desc'), ['zz-untyped', 'sensor-10', 'sensor-9', 'lamp-2', 'lamp-1']);
  t.deepEqual(await ids('?sort=messages&dir=desc'), ['lamp-1', 'lamp-2', 'sensor-9', 'sensor-10', 'zz-untyped'], 'ties by ID');
  t.deepEqual(await ids('?sort=status'), ['lamp-1', 'sensor-9', 'sensor-10', 'zz-untyped', 'lamp-2'], 'up before down');
  t.deepEqual(await ids('?sort=outages&dir=desc'), ['lamp-2', 'lamp-1', 'sensor-9', 'sensor-10', 'zz-untyped']);
  t.deepEqual((await ids('?sort=type')).at(-1), 'zz-untyped', 'no type sorts last');
  t.deepEqual((await ids('?sort=type&dir=desc')).at(-1), 'zz-untyped', 'in both directions');
  t.is((await ids('?sort=lastSeen')).length, 5);

  for (const [q, re] of [
    ['?sort=colour', /sort must be one of id, type, status, lastSeen, outages, messages; got "colour"/],
    ['?status=closed', /status must be one of up, down/],
    ['?dir=up', /dir must be one of asc, desc/],
    ['?typ=lamp', /unknown query parameter "typ"; use type, status/],
    ['?type=a&type=b', /given twice/],
  ] as const) {
    const r = await get(`${s.base}/api/devices${q}`);
    t.is(r.status, 400, q);
    t.regex(r.body.error, re, q);
  }
});

// ---- GET /api/devices/:id and telemetry ---------------------------------------------

test('GET /api/devices/:id: device, last 50 lines both ways, last 100 samples per name; 404 unknown', async (t) => {
  const s = await start(t);
  const id = 'room/1 lamp?';
  const c = await s.device(`${id}##lamp##{"fw":2}`);
  const conn = s.server.get(id)!;
  s.consume(id);
  const url = `${s.base}/api/devices/${encodeURIComponent(id)}`;

  await c.write('hello');
  t.is((await post(`${url}/messages`, { line: 'welcome' })).status, 200);
  let r = await get(url);
  t.is(r.status, 200);
  t.is(r.body.device.id, id);
  t.is(r.body.device.type, 'lamp');
  t.deepEqual(r.body.device.meta, { fw: 2 });
  t.deepEqual(
    r.body.recent.map((x: any) => [x.dir, x.line]),
    [
      ['in', 'hello'],
      ['out', 'welcome'],
    ],
  );
  t.true(r.body.recent.every((x: any) => typeof x.t === 'number' && x.t > 0));
  t.deepEqual(r.body.telemetry, {});

  for (let i = 0; i < 60; i++) await c.write(`n${i}`);
  for (let i = 0; i < 150; i++) conn.record('temp', i, 1000 + i);
  conn.record('door', 'open', 5000);
  r = await get(url);
  t.is(r.body.recent.length, 50);
  t.is(r.body.recent[0].line, 'n10', 'oldest first');
  t.is(r.body.recent[49].line, 'n59');
  t.is(r.body.telemetry.temp.length, 100);
  t.deepEqual(r.body.telemetry.temp[0], { t: 1050, value: 50 });
  t.deepEqual(r.body.telemetry.temp[99], { t: 1149, value: 149 });
  t.deepEqual(r.body.telemetry.door, [{ t: 5000, value: 'open' }]);
  t.deepEqual(r.body.device.telemetry.temp, { t: 1149, value: 149 });

  // Long lines: the ring keeps at most RECENT_CHARS of text per device.
  const long = 'L'.repeat(60_000);
  for (let i = 0; i < 6; i++) await c.write(long + i);
  const lr = (await get(url)).body.recent as Array<{ line: string }>;
  t.deepEqual(lr.map((x) => x.line.slice(-1)), ['2', '3', '4', '5'], `${lr.length} lines kept`);
  t.true(lr.reduce((n, x) => n + x.line.length, 0) <= RECENT_CHARS);

  const tq = await get(`${url}/telemetry/temp?from=1100&to=1102`);
  t.is(tq.status, 200);
  t.deepEqual(tq.body, {
    samples: [
      { t: 1100, value: 100 },
      { t: 1101, value: 101 },
      { t: 1102, value: 102 },
    ],
  });
  t.is((await get(`${url}/telemetry/temp`)).body.samples.length, 150, 'without a range: all that is kept');
  t.is((await get(`${url}/telemetry/temp?from=1140`)).body.samples.length, 10);
  t.deepEqual((await get(`${url}/telemetry/humidity`)).body, { samples: [] });
  const badRange = await get(`${url}/telemetry/temp?from=soon`);
  t.is(badRange.status, 400);
  t.regex(badRange.body.error, /from must be a time in ms since the epoch/);
  const swapped = await get(`${url}/telemetry/temp?from=2000&to=1000`);
  t.is(swapped.status, 400);
  t.regex(swapped.body.error, /swap them/);

  for (const u of [`${s.base}/api/devices/nobody`, `${s.base}/api/devices/nobody/telemetry/temp`]) {
    const nf = await get(u);
    t.is(nf.status, 404, u);
    t.regex(nf.body.error, /no device "nobody": it has never connected; GET \/api\/devices lists the known ones/);
  }
  const malformed = await get(`${s.base}/api/devices/%E0%A4%A`);
  t.is(malformed.status, 400);
  t.regex(malformed.body.error, /percent-encoding/);
});

// ---- POST /api/devices/:id/messages --------------------------------------------------

test('POST a message: the device gets it and the answer says delivered; accepted; timeout is 504 failed', async (t) => {
  const s = await start(t);
  const lamp = await s.device('lamp-1');
  const url = `${s.base}/api/devices/lamp-1/messages`;

  const r = await post(url, { line: '{"on":true}' });
  t.is(r.status, 200);
  t.deepEqual(r.body, { id: 'lamp-1', status: 'delivered' });
  t.is(await lamp.readline(), '{"on":true}\n');

  const trailing = await post(url, { line: 'with newline at the end\n', timeout: 5000, accepted: false });
  t.is(trailing.body.status, 'delivered', 'one trailing \\n is allowed and stripped');
  t.is(await lamp.readline(), 'with newline at the end\n');

  const acc = await post(url, { line: 'later', accepted: true });
  t.deepEqual(acc.body, { id: 'lamp-1', status: 'accepted' });
  t.is(await lamp.readline(), 'later\n');

  await s.down('lamp-1', lamp);
  const started = Date.now();
  const late = await post(url, { line: 'nobody listens', timeout: 300 });
  t.is(late.status, 504);
  t.is(late.body.id, 'lamp-1');
  t.is(late.body.status, 'failed');
  t.regex(late.body.error, /not acknowledged within 300 ms \(device down\).*retry later/);
  t.true(Date.now() - started >= 290);
});

test('POST a message: every malformed request is a 4xx that says what to send', async (t) => {
  const s = await start(t);
  await s.device('lamp-1');
  const url = `${s.base}/api/devices/lamp-1/messages`;
  const cases: Array<[unknown, RegExp]> = [
    [[1, 2], /the body must be a JSON object like \{"line": "text"\}/],
    ['"just a string"', /the body must be a JSON object/],
    ['null', /the body must be a JSON object/],
    [{}, /"line" must be a non-empty string/],
    [{ line: '' }, /"line" must be a non-empty string/],
    [{ line: 5 }, /"line" must be a non-empty string/],
    [{ line: 'a\nb' }, /"line" has "\\n" inside; .*one POST per line/],
    [{ line: '\n' }, /only "\\n"/],
    [{ line: 'x', timeout: '5' }, /"timeout" must be a whole number of ms from 1 to 600000/],
    [{ line: 'x', timeout: 0 }, /"timeout" must be a whole number/],
    [{ line: 'x', timeout: 600001 }, /"timeout" must be a whole number/],
    [{ line: 'x', timeout: 1.5 }, /"timeout" must be a whole number/],
    [{ line: 'x', accepted: 'yes' }, /"accepted" must be true .* or false/],
    [{ line: 'x', type: 'lamp' }, /unknown key "type"; the keys are line, timeout, accepted/],
    [{ line: 'x', colour: 'red' }, /unknown key "colour"/],
    ['{"line": "x",', /not valid JSON .*send a JSON object like/],
    ['', /the body is empty/],
    [{ line: 'x'.repeat(MAX_BODY) }, /the body is \d+ bytes; the limit is 65536 bytes/],
  ];
  for (const [body, re] of cases) {
    const r = await post(url, body);
    t.is(r.status, 400, JSON.stringify(body).slice(0, 60));
    t.regex(r.body.error, re, JSON.stringify(body).slice(0, 60));
  }
  const text = await fetch(url, { method: 'POST', headers: { 'content-type': 'text/plain' }, body: 'hello' });
  t.is(text.status, 415);
  t.regex(((await text.json()) as { error: string }).error, /Content-Type: application\/json/);
  const none = await fetch(url, { method: 'POST', body: new Uint8Array([1, 2]) });
  t.is(none.status, 415);

  const nf = await post(`${s.base}/api/devices/ghost/messages`, { line: 'x' });
  t.is(nf.status, 404);
  t.regex(nf.body.error, /no device "ghost"/);

  const wrongMethod = await get(url);
  t.is(wrongMethod.status, 405);
  t.is(wrongMethod.headers.get('allow'), 'POST');
  t.regex(wrongMethod.body.error, /takes POST, not GET/);

  const unknown = await get(`${s.base}/api/nothing`);
  t.is(unknown.status, 404);
  t.regex(unknown.body.error, /there are GET \/api\/devices/);

  // Still serving after all that.
  t.deepEqual((await post(url, { line: 'fine' })).body, { id: 'lamp-1', status: 'delivered' });

  // A line the devices' maxLineLength does not allow.
  const small = await start(t, { maxLineLength: 100 });
  await small.device('lamp-9');
  const tooLong = await post(`${small.base}/api/devices/lamp-9/messages`, { line: 'y'.repeat(99) });
  t.is(tooLong.status, 400);
  t.regex(tooLong.body.error, /"line" is 99 bytes; devices take at most 98 \(maxLineLength in the config\)/);
});

test('with a token, POSTs need "Authorization: Bearer <token>"; GETs and the WebSocket stay open', async (t) => {
  const s = await start(t, { token: 's3cret' });
  const lamp = await s.device('lamp-1');
  const url = `${s.base}/api/devices/lamp-1/messages`;

  const missing = await post(url, { line: 'x' });
  t.is(missing.status, 401);
  t.regex(missing.body.error, /needs a token for POST: send the header "Authorization: Bearer <token>"/);
  t.regex(missing.headers.get('www-authenticate')!, /^Bearer/);
  const wrong = await post(url, { line: 'x' }, { authorization: 'Bearer nope' });
  t.is(wrong.status, 401);
  t.regex(wrong.body.error, /wrong token/);
  const bc = await post(`${s.base}/api/broadcast`, { line: 'x' });
  t.is(bc.status, 401);
  t.is(lamp.buffered, 0);

  const ok = await post(url, { line: 'authorised' }, { authorization: 'Bearer s3cret' });
  t.deepEqual(ok.body, { id: 'lamp-1', status: 'delivered' });
  t.is(await lamp.readline(), 'authorised\n');

  t.is((await get(`${s.base}/api/devices`)).status, 200);
  t.is((await get(`${s.base}/metrics`)).status, 200);
  const b = await browser(t, s);
  const init = await b.next((m) => m.t === 'INIT');
  t.deepEqual(init.devices.map((d: any) => d.id), ['lamp-1']);
});

// ---- POST /api/broadcast -----------------------------------------------------------

test('POST /api/broadcast sends to a type (or to all) and reports each recipient', async (t) => {
  const s = await start(t);
  const l1 = await s.device('lamp-1');
  const l2 = await s.device('lamp-2');
  const sensor = await s.device('sensor-1');
  const l3 = await s.device('lamp-3');
  await s.down('lamp-3', l3);

  const r = await post(`${s.base}/api/broadcast`, { line: 'all on', type: 'lamp', timeout: 400 });
  t.is(r.status, 200);
  const byId = Object.fromEntries(r.body.outcomes.map((o: any) => [o.id, o.status]));
  t.deepEqual(byId, { 'lamp-1': 'delivered', 'lamp-2': 'delivered', 'lamp-3': 'failed' });
  t.regex(r.body.outcomes.find((o: any) => o.id === 'lamp-3').error, /not acknowledged within 400 ms/);
  t.is(await l1.readline(), 'all on\n');
  t.is(await l2.readline(), 'all on\n');
  t.is(sensor.buffered, 0);

  const every = await post(`${s.base}/api/broadcast`, { line: 'hello all', accepted: true });
  t.deepEqual(every.body.outcomes.map((o: any) => o.id).sort(), ['lamp-1', 'lamp-2', 'lamp-3', 'sensor-1']);
  t.true(every.body.outcomes.every((o: any) => o.status === 'accepted'));
  t.is(await sensor.readline(), 'hello all\n');

  t.deepEqual((await post(`${s.base}/api/broadcast`, { line: 'x', type: 'toaster' })).body, { outcomes: [] });
  const bad = await post(`${s.base}/api/broadcast`, { line: 'x', type: '' });
  t.is(bad.status, 400);
  t.regex(bad.body.error, /"type" must be a non-empty string .*leave it out to send to every device/);
  const noLine = await post(`${s.base}/api/broadcast`, { type: 'lamp' });
  t.is(noLine.status, 400);
  t.regex(noLine.body.error, /"line" must be a non-empty string, the line to send, e\.g\. \{"line": "text", "type": "lamp"\}/);
});

// ---- /metrics ------------------------------------------------------------------

test('GET /metrics is Prometheus text whose counters follow the fleet', async (t) => {
  const s = await start(t);
  const lamp = await s.device('lamp-1');
  const sensor = await s.device('sensor-1');
  const scrape = async () => {
    const r = await fetch(`${s.base}/metrics`);
    t.is(r.status, 200);
    t.regex(r.headers.get('content-type')!, /^text\/plain; version=0\.0\.4/);
    return parseMetrics(await r.text());
  };
  const m1 = await scrape();
  t.is(m1.get('tether_connections{state="up"}'), 2);
  t.is(m1.get('tether_connections{state="down"}'), 0);
  t.is(m1.get('tether_connects_total'), 2);
  for (const name of [
    'tether_outages_total',
    'tether_messages_total{dir="in"}',
    'tether_messages_total{dir="out"}',
    'tether_retransmits_total',
    'tether_duplicates_dropped_total',
    'tether_bytes_total{dir="in"}',
    'tether_bytes_total{dir="out"}',
    'tether_bad_lines_total',
    'tether_handshakes_rejected_total{reason="badId"}',
    'tether_handshakes_rejected_total{reason="idTimeout"}',
    'nodejs_eventloop_lag_seconds',
    'process_cpu_user_seconds_total',
  ]) {
    t.true(m1.has(name), `${name} is exported`);
  }

  for (let i = 0; i < 5; i++) await lamp.write(`m${i}`);
  await post(`${s.base}/api/devices/sensor-1/messages`, { line: 'x' });
  const peer = await RawPeer.connect(s.server.port);
  peer.socket.write('bad##\n');
  await peer.closed;
  await s.down('sensor-1', sensor);

  const m2 = await scrape();
  t.is(m2.get('tether_messages_total{dir="in"}')! - m1.get('tether_messages_total{dir="in"}')!, 5);
  t.is(m2.get('tether_messages_total{dir="out"}')! - m1.get('tether_messages_total{dir="out"}')!, 1);
  t.true(m2.get('tether_bytes_total{dir="in"}')! > m1.get('tether_bytes_total{dir="in"}')!);
  t.is(m2.get('tether_handshakes_rejected_total{reason="badId"}'), 1);
  t.is(m2.get('tether_connections{state="up"}'), 1);
  t.is(m2.get('tether_connections{state="down"}'), 1);
  t.is(m2.get('tether_outages_total'), 1);

  // A Connection the app closes leaves the registry; its counts stay in the totals.
  s.server.get('lamp-1')!.close();
  await waitFor('lamp-1 to be retired', () => s.server.get('lamp-1') === undefined);
  const m3 = await scrape();
  t.is(m3.get('tether_messages_total{dir="in"}'), m2.get('tether_messages_total{dir="in"}'));
  t.is(m3.get('tether_connections{state="up"}'), 0);
});

// ---- WebSocket --------------------------------------------------------------------

test('WebSocket: INIT on connect, then UPDT when a device goes down and when one sends a line', async (t) => {
  const s = await start(t);
  const lamp = await s.device('lamp-1');
  const sensor = await s.device('sensor-1');
  const b = await browser(t, s);
  const init = await b.next((m) => m.t === 'INIT', 0, 'INIT');
  t.deepEqual(init.filter, { type: null, status: null, q: '', sort: 'id', dir: 'asc' });
  t.deepEqual(init.devices.map((d: any) => [d.id, d.status]), [
    ['lamp-1', 'up'],
    ['sensor-1', 'up'],
  ]);

  let mark = b.msgs.length;
  await s.down('sensor-1', sensor);
  const gone = await b.next((m) => m.t === 'UPDT' && m.devices.some((d: any) => d.id === 'sensor-1' && d.status === 'down'), mark, 'UPDT with sensor-1 down');
  t.false('removed' in gone);

  mark = b.msgs.length;
  await lamp.write('hello');
  const upd = await b.next((m) => m.t === 'UPDT' && m.devices.some((d: any) => d.id === 'lamp-1' && d.counters.messagesIn === 1), mark, 'UPDT after a line');
  t.true(upd.devices.every((d: any) => d.id === 'lamp-1'), 'only changed devices');

  // A burst of lines: UPDTs come at most every 250 ms, the last one with the final counts.
  mark = b.msgs.length;
  const startedAt = Date.now();
  for (let i = 0; i < 30; i++) await lamp.write(`burst ${i}`);
  const last = await b.next((m) => m.t === 'UPDT' && m.devices.some((d: any) => d.id === 'lamp-1' && d.counters.messagesIn === 31), mark, 'UPDT with all 31 lines');
  const updts = b.msgs.slice(mark).filter((m) => m.t === 'UPDT');
  t.true(updts.includes(last));
  const elapsed = Date.now() - startedAt;
  t.true(updts.length <= Math.ceil(elapsed / UPDT_INTERVAL) + 1, `${updts.length} UPDTs in ${elapsed} ms`);
  t.false(b.msgs.some((m) => m.t === 'MSG'), 'no MSG without SEL');
});

test('WebSocket: UPDTs to one browser are at least 250 ms apart', async (t) => {
  const s = await start(t);
  const lamp = await s.device('lamp-1');
  s.consume('lamp-1');
  const b = await browser(t, s);
  await b.next((m) => m.t === 'INIT');
  const times: number[] = [];
  b.ws.on('message', (d) => JSON.parse(String(d)).t === 'UPDT' && times.push(Date.now()));
  // The device talks without pause until 5 UPDTs came (bounded by count and time).
  const deadline = Date.now() + 30_000;
  for (let i = 0; i < 100_000 && times.length < 5 && Date.now() < deadline; i++) await lamp.write(`x${i}`);
  t.true(times.length >= 5, `${times.length} UPDTs`);
  // Over the whole run (one late arrival can shorten a single gap as seen here; the server's spacing holds on average).
  const span = times[times.length - 1] - times[0];
  t.true(span >= (times.length - 1) * UPDT_INTERVAL - 100, `${times.length} UPDTs in ${span} ms`);
});

test('WebSocket: FILT changes the INIT set and which UPDTs come; removed lists devices that left the view', async (t) => {
  const s = await start(t);
  const lamp = await s.device('lamp-1##lamp##{"room":"hall"}');
  const l2 = await s.device('lamp-2');
  const sensor = await s.device('sensor-1');
  const b = await browser(t, s);
  await b.next((m) => m.t === 'INIT');

  let mark = b.msgs.length;
  b.send({ t: 'FILT', type: 'lamp', sort: 'id', dir: 'desc' });
  let init = await b.next((m) => m.t === 'INIT', mark, 'INIT after FILT');
  t.deepEqual(init.filter, { type: 'lamp', status: null, q: '', sort: 'id', dir: 'desc' });
  t.deepEqual(init.devices.map((d: any) => d.id), ['lamp-2', 'lamp-1']);

  // The sensor's line reaches the server (its write is ACKed) before the lamp's.
  mark = b.msgs.length;
  await sensor.write('not for this browser');
  await lamp.write('for this browser');
  await b.next((m) => m.t === 'UPDT' && m.devices.some((d: any) => d.id === 'lamp-1'), mark, 'UPDT with lamp-1');
  t.false(
    b.msgs.slice(mark).some((m) => m.t === 'UPDT' && m.devices.some((d: any) => d.id === 'sensor-1')),
    'a device outside the filter is not sent',
  );

  mark = b.msgs.length;
  b.send({ t: 'FILT', status: 'up', q: 'HALL' });
  init = await b.next((m) => m.t === 'INIT', mark, 'INIT after the second FILT');
  t.deepEqual(init.filter, { type: 'lamp', status: 'up', q: 'HALL', sort: 'id', dir: 'desc' }, 'keys left out are kept');
  t.deepEqual(init.devices.map((d: any) => d.id), ['lamp-1']);

  mark = b.msgs.length;
  b.send({ t: 'FILT', type: null, q: '' });
  init = await b.next((m) => m.t === 'INIT', mark);
  t.deepEqual(init.devices.map((d: any) => d.id), ['sensor-1', 'lamp-2', 'lamp-1'], 'still sorted by ID, descending');
  mark = b.msgs.length;
  await s.down('lamp-2', l2);
  const upd = await b.next((m) => m.t === 'UPDT' && m.removed, mark, 'UPDT with removed');
  t.deepEqual(upd.removed, ['lamp-2'], 'a device that no longer matches (it went down) is listed in removed');
  t.false(upd.devices.some((d: any) => d.id === 'lamp-2'));
});

test('WebSocket: SEL streams MSG lines of the selected device only, both directions', async (t) => {
  const s = await start(t);
  const lamp = await s.device('lamp-1');
  const other = await s.device('lamp-2');
  const b = await browser(t, s);
  await b.next((m) => m.t === 'INIT');
  b.send({ t: 'SEL', id: 'lamp-1' });
  // SEL has no answer; a FILT round trip shows it was processed.
  b.send({ t: 'FILT' });
  await b.next((m) => m.t === 'INIT', 1);

  const mark = b.msgs.length;
  await other.write('from the other one');
  await lamp.write('ping');
  const inMsg = await b.next((m) => m.t === 'MSG' && m.dir === 'in', mark, 'MSG in');
  t.is(inMsg.id, 'lamp-1');
  t.is(inMsg.line, 'ping');
  t.true(Math.abs(inMsg.time - Date.now()) < 10_000);
  t.is((await post(`${s.base}/api/devices/lamp-1/messages`, { line: 'pong' })).status, 200);
  const outMsg = await b.next((m) => m.t === 'MSG' && m.dir === 'out', mark, 'MSG out');
  t.deepEqual([outMsg.id, outMsg.line], ['lamp-1', 'pong']);
  t.false(b.msgs.some((m) => m.t === 'MSG' && m.id !== 'lamp-1'), 'nothing from an unselected device');

  b.send({ t: 'SEL', id: null });
  b.send({ t: 'FILT' });
  const m2 = b.msgs.length;
  await b.next((m) => m.t === 'INIT', m2 - 1);
  const after = b.msgs.length;
  await lamp.write('unwatched');
  await b.next((m) => m.t === 'UPDT' && m.devices.some((d: any) => d.counters.messagesIn === 2), after, 'UPDT for the unwatched line');
  t.false(b.msgs.slice(after).some((m) => m.t === 'MSG'), 'SEL null stops the stream');
});

test('WebSocket: invalid messages get ERR and the socket lives on; cross-origin and oversize are refused', async (t) => {
  const s = await start(t);
  await s.device('lamp-1');
  const b = await browser(t, s);
  await b.next((m) => m.t === 'INIT');
  const cases: Array<[string | Buffer, RegExp]> = [
    ['not json', /not valid JSON/],
    ['[]', /send a JSON object/],
    ['{"t":"NOPE"}', /unknown message type "NOPE"; send "t": "FILT", "MORE" or "SEL"/],
    ['{"t":"MORE","n":5}', /MORE: unknown key "n"/],
    ['{"t":"FILT","sort":"colour"}', /FILT "sort" must be one of id, type/],
    ['{"t":"FILT","status":"closed"}', /FILT "status" \(or null\) must be one of up, down/],
    ['{"t":"FILT","type":5}', /FILT "type" must be a type name, or null/],
    ['{"t":"FILT","q":null}', /FILT "q" must be a string/],
    ['{"t":"FILT","extra":1}', /FILT: unknown key "extra"/],
    ['{"t":"SEL"}', /SEL needs "id"/],
    ['{"t":"SEL","id":7}', /SEL needs "id"/],
    [Buffer.from([1, 2, 3]), /send text frames/],
    [JSON.stringify({ t: 'FILT', q: 'x'.repeat(20_000) }), /the limit is 16384/],
  ];
  for (const [msg, re] of cases) {
    const mark = b.msgs.length;
    b.ws.send(msg);
    const err = await b.next((m) => m.t === 'ERR', mark, `ERR for ${String(msg).slice(0, 40)}`);
    t.regex(err.error, re);
  }
  const mark = b.msgs.length;
  b.send({ t: 'FILT', type: 'lamp' });
  const init = await b.next((m) => m.t === 'INIT', mark);
  t.deepEqual(init.filter.type, 'lamp', 'the filter was not changed by the bad FILTs; the socket still works');
  t.is(init.filter.sort, 'id');

  const huge = await browser(t, s);
  huge.ws.send('x'.repeat(100_000));
  t.is(await huge.closed, 1009, 'a message beyond the hard cap closes that socket (1009 message too big)');
  t.is(b.ws.readyState, WebSocket.OPEN, 'other browsers are unaffected');

  const foreign = new Browser(s.base, { origin: 'http://evil.example' });
  t.teardown(() => foreign.close());
  const e = await t.throwsAsync(foreign.opened);
  t.regex(e!.message, /403/);
  const same = await browser(t, s, { origin: s.base });
  await same.next((m) => m.t === 'INIT');

  const wrongPath = new WebSocket(s.base.replace('http', 'ws') + '/nope');
  const e2 = await new Promise<Error>((r) => wrongPath.once('error', r));
  t.regex(e2.message, /404/);
  const plainGet = await get(`${s.base}/ws`);
  t.is(plainGet.status, 426);
  t.regex(plainGet.body.error, /WebSocket/);
});

test('WebSocket: a browser that stops reading is dropped, the rest carry on', async (t) => {
  const logs: LogRecord[] = [];
  const s = await start(t, { maxBrowserQueue: 64 * 1024, sink: (r) => logs.push(r) });
  const lamp = await s.device('lamp-1');
  s.consume('lamp-1');
  const slow = await browser(t, s);
  const fine = await browser(t, s);
  await slow.next((m) => m.t === 'INIT');
  await fine.next((m) => m.t === 'INIT');
  slow.send({ t: 'SEL', id: 'lamp-1' });
  slow.send({ t: 'FILT' });
  await slow.next((m) => m.t === 'INIT', 1);
  // Stop reading on the slow browser's side: the kernel buffers fill, then the server's queue.
  (slow.ws as unknown as { _socket: import('node:net').Socket })._socket.pause();
  const dropped = () => logs.find((r) => r.msg === 'browser dropped: it reads too slowly');
  const big = 'z'.repeat(30_000);
  const deadline = Date.now() + 30_000;
  for (let i = 0; i < 5000 && !dropped() && Date.now() < deadline; i++) await lamp.write(big);
  const rec = dropped();
  t.truthy(rec, 'the slow browser was dropped, with a logged reason');
  t.true((rec!.queued as number) > 64 * 1024);
  const mark = fine.msgs.length;
  await lamp.write('still here');
  await fine.next((m) => m.t === 'UPDT', mark);
});

// ---- static files -----------------------------------------------------------------

test('static: the dashboard at / and /dashboard/…, uPlot from node_modules, no way out of the folder', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-dash-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.writeFileSync(path.join(dir, 'index.html'), '<!doctype html><title>dash</title>');
  fs.writeFileSync(path.join(dir, 'app.js'), 'console.log(1)');
  fs.writeFileSync(path.join(dir, 'style.css'), 'body{}');
  fs.mkdirSync(path.join(dir, 'sub'));
  fs.symlinkSync(path.join(__dirname, '..', 'package.json'), path.join(dir, 'escape.json'));
  const s = await start(t, { dashboardDir: dir });

  for (const [p, type, body] of [
    ['/', /^text\/html; charset=utf-8/, '<title>dash</title>'],
    ['/dashboard/', /^text\/html/, '<title>dash</title>'],
    ['/dashboard/index.html', /^text\/html/, '<title>dash</title>'],
    ['/dashboard/app.js', /^text\/javascript; charset=utf-8/, 'console.log(1)'],
    ['/dashboard/style.css', /^text\/css; charset=utf-8/, 'body{}'],
    ['/app.js', /^text\/javascript/, 'console.log(1)'],
  ] as const) {
    const r = await get(s.base + p);
    t.is(r.status, 200, p);
    t.regex(r.headers.get('content-type')!, type, p);
    t.true(r.body.includes(body), p);
  }
  const js = await get(`${s.base}/vendor/uplot/uPlot.iife.min.js`);
  t.is(js.status, 200);
  t.regex(js.headers.get('content-type')!, /^text\/javascript/);
  t.regex(js.body, /uPlot/);
  const css = await get(`${s.base}/vendor/uplot/uPlot.min.css`);
  t.is(css.status, 200);
  t.regex(css.headers.get('content-type')!, /^text\/css/);
  t.is((await get(`${s.base}/vendor/uplot/package.json`)).status, 404);

  for (const p of [
    '/dashboard/..%2f..%2fpackage.json',
    '/..%2f..%2fpackage.json',
    '/dashboard/%2e%2e/%2e%2e/package.json',
    '/dashboard/../../package.json',
    '/%2fetc%2fpasswd',
    '/dashboard/..%5c..%5cpackage.json',
    '/dashboard/escape.json',
    '/dashboard/sub',
    '/dashboard/app.js%00.html',
    '/nothing.js',
  ]) {
    const r = await rawGet(s.api.port, p);
    t.is(r.status, 404, p);
    t.notRegex(r.body, /"devDependencies"|root:/, p);
    t.regex(r.type, /^application\/json/, p);
  }
  const post405 = await fetch(`${s.base}/`, { method: 'POST' });
  t.is(post405.status, 405);

  // Without an index.html: a placeholder that points at the API.
  const empty = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-nodash-'));
  t.teardown(() => fs.rmSync(empty, { recursive: true, force: true }));
  const s2 = await start(t, { dashboardDir: empty });
  const ph = await get(`${s2.base}/`);
  t.is(ph.status, 200);
  t.regex(ph.headers.get('content-type')!, /^text\/html/);
  t.regex(ph.body, /dashboard is not installed.*\/api\/devices/s);
});

test('the repository dashboard (or its placeholder) is served by default', async (t) => {
  const s = await start(t);
  const r = await get(`${s.base}/`);
  t.is(r.status, 200);
  t.regex(r.headers.get('content-type')!, /^text\/html/);
});

// ---- lifecycle and config ------------------------------------------------------------

test('close() ends WebSockets and keep-alive connections; a busy port is an error that says what to change', async (t) => {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: T, logger: silentLogger });
  t.teardown(() => server.close());
  const fleet = new Fleet(server);
  const api = new HttpApi({ server, fleet, port: 0, logger: silentLogger });
  const addr = await api.listen();
  t.is(addr.port, api.port);
  t.is(api.url, `http://127.0.0.1:${api.port}/`);
  const b = new Browser(api.url.replace(/\/$/, ''));
  await b.opened;
  await fetch(`${api.url}api/devices`); // leaves a keep-alive socket open
  const other = new HttpApi({ server, fleet, port: api.port, logger: silentLogger });
  const e = await t.throwsAsync(other.listen());
  t.regex(e!.message, /port \d+ is in use: set another "port" in the "http" section of the config or pass --http-port N \(0 = any free port\), or turn the HTTP API off with "http": null/);
  await other.close();
  await api.close();
  t.is(await b.closed, 1001);
  await t.throwsAsync(fetch(`${api.url}api/devices`));
});

test('config: the "http" section, its defaults, null to turn it off, and its errors', (t) => {
  t.deepEqual(resolveConfig({}).http, { host: '127.0.0.1', port: 8124, token: null, tls: null });
  t.is(resolveConfig({ http: null }).http, null);
  t.deepEqual(resolveConfig({ http: { port: 0, token: 'abc' } }).http, { host: '127.0.0.1', port: 0, token: 'abc', tls: null });
  t.deepEqual(resolveConfig({ http: { tls: { key: 'a.key', cert: 'a.crt' } } }, 'local.json', '/etc/tether').http?.tls, { key: '/etc/tether/a.key', cert: '/etc/tether/a.crt' });
  t.throws(() => resolveConfig({ http: { port: 'x' } }), { message: /"http" must be an object whose "port" is an integer from 0 to 65535/ });
  t.throws(() => resolveConfig({ http: { prot: 1 } }), { message: /"http" must be an object with known keys only \(host, port, token, tls, allowedHosts, maxConnections, .*pageSize\); "prot" is unknown/ });
  // The limits: each validated with what it must be; defaults come from HTTP_LIMIT_DEFAULTS when the HttpApi starts.
  const lim = { allowedHosts: ['gateway.local', '.example.com', '192.168.1.10', '[fe80::1]'], maxConnections: 100, maxConnectionsPerAddress: 10, headersTimeout: 5000, requestTimeout: 20000, keepAliveTimeout: 2000, maxClientLoad: 0.05, maxLoad: 0.2, pageSize: 100 };
  t.like(resolveConfig({ http: lim }).http, lim);
  for (const [k, v, re] of [
    ['allowedHosts', 'gateway.local', /"allowedHosts" is a list of the host names this server is reached by, without ports/],
    ['allowedHosts', ['gateway.local:8124'], /without ports/],
    ['allowedHosts', ['http://x'], /a list of the host names/],
    ['maxConnections', 0, /"maxConnections" is an integer from 1 to 1000000/],
    ['headersTimeout', 50, /"headersTimeout" is an integer from 100 to 3600000/],
    ['keepAliveTimeout', 0, /"keepAliveTimeout" is an integer from 100/],
    ['maxLoad', 1.5, /"maxLoad" is a number above 0 and at most 1/],
    ['maxClientLoad', '10%', /"maxClientLoad" is a number above 0 and at most 1/],
    ['pageSize', 20000, /"pageSize" is an integer from 1 to 10000/],
  ] as const) {
    t.throws(() => resolveConfig({ http: { [k]: v } }), { message: re }, `${k}: ${JSON.stringify(v)}`);
  }
  t.throws(() => resolveConfig({ http: { maxClientLoad: 0.5 } }), { message: /"http" must be an object whose limits fit together: http\.maxClientLoad \(0\.5\) is above http\.maxLoad \(0\.25\)/ });
  t.throws(() => resolveConfig({ http: { token: '' } }), { message: /"token" is null or a non-empty string/ });
  t.throws(() => resolveConfig({ http: true }), { message: /"http" must be null \(off\) or \{ "host"/ });
});

// ---- limits, without sockets --------------------------------------------------------------

test('TokenBucket: refills at its rate up to its capacity; a debt refills before more is allowed', (t) => {
  const b = new TokenBucket(0.01, 10, 0); // 10 a second, at most 10
  t.is(b.tokens(0), 10);
  b.take(15, 0);
  t.is(b.tokens(0), -5);
  t.is(b.waitFor(0, 0), 500, 'the debt of 5 takes 500 ms');
  t.is(b.waitFor(1, 0), 600);
  t.is(b.waitFor(0, 500), 0);
  t.is(b.tokens(100_000), 10, 'never above its capacity');
  t.true(b.full(100_000));
});

test('LoadBudget: a client in debt waits and others do not; all together are held to the total share; memory bounded', (t) => {
  const lb = new LoadBudget(0.1, 0.25, 0); // 100 ms per client, 250 ms for all, per second
  lb.charge('a', 150, 0);
  t.deepEqual(lb.wait('a', 0), { ms: 500, who: 'client' }, '50 ms of debt at 0.1 ms per ms');
  t.deepEqual(lb.wait('b', 0), { ms: 0, who: 'client' });
  lb.charge('b', 90, 0);
  lb.charge('c', 90, 0);
  t.deepEqual(lb.wait('d', 0), { ms: 320, who: 'all' }, 'the total is 80 ms in debt: a newcomer waits too');
  t.is(lb.wait('a', 2000).ms, 0, 'all refilled after a while');
  const small = new LoadBudget(0.1, 0.25, 0, 100);
  for (let i = 0; i < 1000; i++) small.charge(`10.0.${i >> 8}.${i & 255}`, 0.01, i);
  t.is(small.addresses, 100, 'at most maxAddresses remembered');
});

test('hostOf: the host name of a Host header, without port; malformed ones are null', (t) => {
  const cases: Array<[string, string | null]> = [
    ['localhost:8124', 'localhost'],
    ['LOCALHOST.', 'localhost'],
    ['127.0.0.1', '127.0.0.1'],
    ['[::1]:8124', '::1'],
    ['[fe80::1]', 'fe80::1'],
    ['evil.test:80', 'evil.test'],
    ['gateway_1.local', 'gateway_1.local'],
    ['', null],
    ['a b', null],
    ['host:port', null],
    ['host:1:2', null],
    ['[::1', null],
    ['[zz]:1', null],
    ['[::1]x', null],
    ['-leading.dash', null],
  ];
  for (const [h, want] of cases) t.is(hostOf(h), want, JSON.stringify(h));
});

test('HostCheck: loopback names, the listening address, allowedHosts; "*" serves any; no Host header is served', (t) => {
  const local = new HostCheck([], '127.0.0.1');
  for (const h of ['localhost:8124', 'localhost', '127.0.0.1:1', '127.5.5.5', '[::1]:8124', 'app.localhost', 'LOCALHOST.:8124', undefined]) t.true(local.allows(h), String(h));
  for (const h of ['evil.test:8124', 'evil.test', '192.168.1.10', 'localhost.evil.test', '127.0.0.1.evil.test', 'a b', '', '[::2]']) t.false(local.allows(h), String(h));

  t.true(new HostCheck([], '192.168.1.10').allows('192.168.1.10:8124'), 'the address it listens on');
  t.false(new HostCheck([], '192.168.1.10').allows('192.168.1.11:8124'));

  let looked = 0;
  const any = new HostCheck([], '0.0.0.0', () => {
    looked++;
    return ['10.1.2.3', 'fe80::1'];
  });
  t.true(any.allows('10.1.2.3:8124', 0), 'listening on every address: any address of this machine');
  t.true(any.allows('[fe80::1]:8124', 0));
  t.false(any.allows('10.1.2.4', 1));
  t.false(any.allows('gateway.local', 2), 'names still need allowedHosts');
  t.is(looked, 1, 'the machine addresses are looked up again at most every 5 s');
  any.allows('10.1.2.4', 6000);
  t.is(looked, 2);

  const named = new HostCheck(['gateway.local', '.example.com', '192.168.7.7', '[fd00::7]'], '127.0.0.1');
  for (const h of ['GATEWAY.local:8124', 'example.com', 'a.b.example.com:1', '192.168.7.7', '[fd00::7]:1', 'localhost']) t.true(named.allows(h), h);
  for (const h of ['badexample.com', 'gateway.local.evil', 'evil.test']) t.false(named.allows(h), h);

  t.true(new HostCheck(['*'], '127.0.0.1').allows('anything.evil:1'));
});

test('limit options: defaults, and combinations that cannot work are refused with what to change', (t) => {
  t.like(resolveHttpLimits({}), { maxConnections: 256, maxConnectionsPerAddress: 32, headersTimeout: 10000, requestTimeout: 30000, keepAliveTimeout: 5000, maxClientLoad: 0.1, maxLoad: 0.25, pageSize: 500 });
  t.deepEqual(resolveHttpLimits({}).allowedHosts, []);
  t.throws(() => resolveHttpLimits({ maxConnections: 10, maxConnectionsPerAddress: 20 }), { message: /http\.maxConnectionsPerAddress \(20\) is above http\.maxConnections \(10\): lower it or raise maxConnections/ });
  t.throws(() => resolveHttpLimits({ headersTimeout: 60000 }), { message: /http\.headersTimeout \(60000 ms\) is longer than http\.requestTimeout \(30000 ms\)/ });
  t.throws(() => resolveHttpLimits({ maxClientLoad: 0.5 }), { message: /http\.maxClientLoad \(0\.5\) is above http\.maxLoad \(0\.25\)/ });
  t.throws(() => resolveHttpLimits({ allowedHosts: ['*', 'gateway.local'] }), { message: /give \["\*"\] alone \(unsafe\) or only names/ });
  t.throws(() => resolveHttpLimits({ pageSize: 0 }), { message: /http\.pageSize must be an integer from 1 to 10000; got 0/ });
  t.throws(() => new HttpApi({ server: {} as Server, fleet: {} as Fleet, maxLoad: 2 }), { message: /http\.maxLoad must be a number above 0 and at most 1/ });
});

test('selectTop gives the same page as sorting everything, for any data, offset and limit', (t) => {
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 0, max: 50 }), { maxLength: 200 }), fc.nat(220), fc.integer({ min: 1, max: 60 }), (xs, offset, limit) => {
      const keep = (x: number) => x % 3 !== 0;
      const cmp = (a: number, b: number) => a - b;
      const { page, kept } = selectTop(xs, keep, cmp, offset, limit);
      const all = xs.filter(keep).sort(cmp);
      return kept === all.length && JSON.stringify(page) === JSON.stringify(all.slice(offset, offset + limit));
    }),
    { seed: 14, numRuns: 500 },
  );
  // With the device order (ties by ID, missing values last) it matches selectDevices.
  const devices = Array.from({ length: 300 }, (_, i) => ({
    id: `d-${(i * 37) % 301}`,
    type: i % 4 === 0 ? null : `t${i % 3}`,
    meta: { n: i % 5 },
    status: (i % 2 ? 'up' : 'down') as 'up' | 'down',
    lastSeen: i % 7 === 0 ? null : 1000 + (i % 11),
    counters: { outages: i % 6, messagesIn: i % 9, messagesOut: i % 4 },
  }));
  for (const sort of ['id', 'type', 'status', 'lastSeen', 'outages', 'messages'] as const) {
    for (const dir of ['asc', 'desc'] as const) {
      const f = { ...DEFAULT_FILTER, sort, dir, status: sort === 'status' ? null : ('up' as const) };
      const want = selectDevices(devices, f).slice(20, 70).map((d) => d.id);
      const got = selectTop(devices, (d) => f.status === null || d.status === f.status, compareDevices(f), 20, 50).page.map((d) => d.id);
      t.deepEqual(got, want, `${sort} ${dir}`);
    }
  }
});

test('validate.page: limit and offset of GET /api/devices', (t) => {
  t.deepEqual(validate.page(new URLSearchParams('')), { limit: LIST_LIMIT.default, offset: 0 });
  t.deepEqual(validate.page(new URLSearchParams('limit=5&offset=10')), { limit: 5, offset: 10 });
  for (const q of ['limit=0', 'limit=10001', 'limit=-1', 'limit=1.5', 'limit=abc', 'offset=-3', 'offset=1e3', 'offset=99999999999']) {
    const e = t.throws(() => validate.page(new URLSearchParams(q)), { instanceOf: HttpProblem }, q);
    t.is(e!.status, 400);
    t.regex(e!.message, /must be a whole number from/);
  }
});

// ---- limits, over sockets ------------------------------------------------------------------

/** One request with an exact Host header, from a chosen loopback address. */
function rawRequest(port: number, opts: { path?: string; host?: string; method?: string; localAddress?: string; headers?: Record<string, string>; body?: string }): Promise<{ status: number; body: any; headers: http.IncomingHttpHeaders }> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { ...(opts.headers ?? {}) };
    if (opts.host !== undefined) headers.host = opts.host;
    const req = http.request({ host: '127.0.0.1', port, path: opts.path ?? '/api/devices', method: opts.method ?? 'GET', localAddress: opts.localAddress, headers, agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (text += d));
      res.on('end', () => {
        let body: unknown = text;
        if ((res.headers['content-type'] ?? '').startsWith('application/json')) body = JSON.parse(text);
        resolve({ status: res.statusCode!, body, headers: res.headers });
      });
    });
    req.on('error', reject);
    req.end(opts.body);
  });
}

test('Host check: requests and WebSocket upgrades for a name the server does not know get 421 naming the option', async (t) => {
  const s = await start(t);
  await s.device('lamp-1');
  const port = s.api.port;
  for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, `[::1]:${port}`, `my.localhost:${port}`]) {
    t.is((await rawRequest(port, { host })).status, 200, host);
  }
  const evil = await rawRequest(port, { host: `evil.test:${port}` });
  t.is(evil.status, 421);
  t.regex(evil.body.error, /does not answer to the host name "evil\.test:\d+": if that is a name it is reached by, add it to "allowedHosts" in the "http" section/);
  const post = await rawRequest(port, { host: `evil.test:${port}`, method: 'POST', path: '/api/devices/lamp-1/messages', headers: { 'content-type': 'application/json' }, body: '{"line":"x"}' });
  t.is(post.status, 421, 'a POST too: nothing reaches the device');
  t.is((await rawRequest(port, { host: `evil.test:${port}`, path: '/metrics' })).status, 421);
  t.is((await rawRequest(port, { host: `evil.test:${port}`, path: '/' })).status, 421, 'the dashboard too');
  t.is(s.api.limits.httpHost, 4);

  // WebSocket: the upgrade is refused before any message.
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`, { headers: { host: `evil.test:${port}`, origin: `http://evil.test:${port}` } });
  ws.on('error', () => {});
  const status = await new Promise<number>((resolve) => {
    ws.on('unexpected-response', (req, res) => {
      resolve(res.statusCode!);
      req.destroy();
    });
    ws.on('open', () => {
      resolve(101);
      ws.terminate();
    });
  });
  t.is(status, 421);

  // allowedHosts adds names; "*" serves any.
  const named = await start(t, { allowedHosts: ['evil.test', '.example.com'] });
  t.is((await rawRequest(named.api.port, { host: `evil.test:${named.api.port}` })).status, 200);
  t.is((await rawRequest(named.api.port, { host: 'iot.example.com' })).status, 200);
  t.is((await rawRequest(named.api.port, { host: 'other.test' })).status, 421);
  const open = await start(t, { allowedHosts: ['*'] });
  t.is((await rawRequest(open.api.port, { host: 'anything.test' })).status, 200);
});

test('GET /api/devices pages: limit, offset, total and next; the same order as without paging', async (t) => {
  const s = await start(t);
  for (const id of ['lamp-3', 'lamp-1', 'sensor-2', 'lamp-2', 'sensor-10']) await s.device(id);
  const all = await get(`${s.base}/api/devices`);
  t.is(all.body.total, 5);
  t.is(all.body.next, null);
  const ids = all.body.devices.map((d: any) => d.id);
  t.deepEqual(ids, ['lamp-1', 'lamp-2', 'lamp-3', 'sensor-2', 'sensor-10']);
  const p1 = await get(`${s.base}/api/devices?limit=2`);
  t.deepEqual([p1.body.devices.map((d: any) => d.id), p1.body.total, p1.body.next], [ids.slice(0, 2), 5, 2]);
  const p2 = await get(`${s.base}/api/devices?limit=2&offset=${p1.body.next}`);
  t.deepEqual([p2.body.devices.map((d: any) => d.id), p2.body.next], [ids.slice(2, 4), 4]);
  const p3 = await get(`${s.base}/api/devices?limit=2&offset=${p2.body.next}`);
  t.deepEqual([p3.body.devices.map((d: any) => d.id), p3.body.next], [ids.slice(4), null]);
  const lamps = await get(`${s.base}/api/devices?type=lamp&dir=desc&limit=1&offset=1`);
  t.deepEqual([lamps.body.devices.map((d: any) => d.id), lamps.body.total, lamps.body.next], [['lamp-2'], 3, 2]);
  t.deepEqual((await get(`${s.base}/api/devices?offset=99`)).body, { devices: [], total: 5, next: null });
  const badLimit = await get(`${s.base}/api/devices?limit=${LIST_LIMIT.max + 1}`);
  t.is(badLimit.status, 400);
  t.regex(badLimit.body.error, /limit must be a whole number from 1 to 10000/);
});

test('WebSocket pages: INIT has the first page and the count, MORE the next; UPDTs only for rows shown until all are', async (t) => {
  const s = await start(t, { pageSize: 2 });
  const devs = new Map<string, Client>();
  for (const id of ['lamp-1', 'lamp-2', 'lamp-3', 'lamp-4', 'lamp-5']) devs.set(id, await s.device(id));
  const b = await browser(t, s);
  const init = await b.next((m) => m.t === 'INIT', 0, 'INIT');
  t.deepEqual([init.devices.map((d: any) => d.id), init.total, init.complete], [['lamp-1', 'lamp-2'], 5, false]);

  // A device not shown changes: no UPDT row for it (the count is refreshed now and then).
  let mark = b.msgs.length;
  await devs.get('lamp-5')!.write('not shown yet');
  await devs.get('lamp-1')!.write('shown');
  const upd = await b.next((m) => m.t === 'UPDT' && m.devices.some((d: any) => d.id === 'lamp-1'), mark, 'UPDT for a shown row');
  t.false(b.msgs.slice(mark).some((m) => m.t === 'UPDT' && m.devices.some((d: any) => d.id === 'lamp-5')), 'nothing about a row not shown');
  t.false('total' in upd, 'the count did not change');

  mark = b.msgs.length;
  b.send({ t: 'MORE' });
  const p1 = await b.next((m) => m.t === 'PAGE', mark, 'PAGE 1');
  t.deepEqual([p1.devices.map((d: any) => d.id), p1.total, p1.complete], [['lamp-3', 'lamp-4'], 5, false]);
  mark = b.msgs.length;
  b.send({ t: 'MORE' });
  b.send({ t: 'MORE' }); // asked again before the answer: the second gets what is left then (nothing)
  const p2 = await b.next((m) => m.t === 'PAGE', mark, 'PAGE 2');
  t.deepEqual([p2.devices.map((d: any) => d.id), p2.complete], [['lamp-5'], true]);
  t.is(p2.devices[0].counters.messagesIn, 1, 'with its news');
  const done = await b.next((m) => m.t === 'PAGE' && m !== p2, mark, 'the second MORE answered');
  t.deepEqual([done.devices, done.complete], [[], true]);

  // Now every matching device is shown: a new one arrives as an UPDT row, with the new count.
  mark = b.msgs.length;
  await s.device('lamp-6');
  const added = await b.next((m) => m.t === 'UPDT' && m.devices.some((d: any) => d.id === 'lamp-6'), mark, 'UPDT with the new device');
  t.is(added.total, 6);

  // A FILT starts over with a fresh first page.
  mark = b.msgs.length;
  b.send({ t: 'FILT', dir: 'desc' });
  const init2 = await b.next((m) => m.t === 'INIT', mark, 'INIT after FILT');
  t.deepEqual([init2.devices.map((d: any) => d.id), init2.total, init2.complete], [['lamp-6', 'lamp-5'], 6, false]);
});

test('WebSocket: a burst of FILTs costs an INIT or two, with the last filter; a flood is paused, then dropped', async (t) => {
  const s = await start(t);
  for (const id of ['lamp-1', 'sensor-1']) await s.device(id);
  const b = await browser(t, s);
  await b.next((m) => m.t === 'INIT');
  const mark = b.msgs.length;
  // 60 at once: past the burst of 40 (the socket is paused), not yet a flood (40 more would be).
  for (let i = 0; i < 59; i++) b.send({ t: 'FILT', type: i % 2 ? 'sensor' : 'lamp' });
  b.send({ t: 'FILT', type: 'sensor', dir: 'desc' });
  const last = await b.next((m) => m.t === 'INIT' && m.filter.dir === 'desc', mark, 'the INIT of the last filter');
  t.deepEqual(last.devices.map((d: any) => d.id), ['sensor-1']);
  const inits = b.msgs.slice(mark).filter((m) => m.t === 'INIT').length;
  t.true(inits <= 5, `${inits} INITs for 60 FILTs`);
  t.true(s.api.limits.httpLoad >= 1, 'the browser was paused (past 40 messages in a burst)');

  const flood = await browser(t, s);
  await flood.next((m) => m.t === 'INIT');
  for (let i = 0; i < 2000; i++) flood.send({ t: 'SEL', id: null });
  t.is(await flood.closed, 1006, 'a flood far past the rate is dropped (its slot freed)');
  t.is(b.ws.readyState, WebSocket.OPEN, 'the other browser is not');
});

test(`more than ${MAX_PIPELINED} pipelined requests on one socket close it; other clients are served`, async (t) => {
  const s = await start(t);
  await s.device('lamp-1');
  const sock = net.connect(s.api.port, '127.0.0.1');
  let text = '';
  sock.on('data', (d) => (text += d.toString('latin1')));
  const closed = new Promise<void>((r) => sock.once('close', () => r()));
  sock.on('error', () => {});
  await new Promise<void>((r) => sock.once('connect', () => r()));
  sock.write(`GET /api/devices HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`.repeat(2000));
  await closed;
  const answers = text.split('HTTP/1.1 ').length - 1;
  t.true(answers <= MAX_PIPELINED + 1, `${answers} answers of 2000 requests`);
  t.true(s.api.limits.httpPipelining >= 1);
  t.is((await get(`${s.base}/api/devices`)).status, 200);
});

test('budget: a client over maxClientLoad gets 429 saying when to retry; another address is served; all over maxLoad get 503', async (t) => {
  const s = await start(t, { maxClientLoad: 0.005, maxLoad: 0.05 });
  for (let i = 0; i < 20; i++) await s.device(`lamp-${i}##lamp##{"room":"r${i}"}`);
  // Bounded loops; a socket refused outright (its address far over its share) waits a moment and tries again.
  const until = async (localAddress: (i: number) => string, want: number) => {
    let r: Awaited<ReturnType<typeof rawRequest>> | null = null;
    for (let i = 0; i < 5000 && r?.status !== want; i++) {
      r = await rawRequest(s.api.port, { localAddress: localAddress(i), path: '/api/devices?q=room' }).catch(() => null);
      if (r === null) await new Promise((ok) => setTimeout(ok, 100));
    }
    return r;
  };
  const r = await until(() => '127.0.0.2', 429);
  t.is(r?.status, 429);
  t.regex(r!.body.error, /too many requests from 127\.0\.0\.2: it used its share of the server's time \(http\.maxClientLoad 0\.005;.*retry in \d+ s/);
  t.regex(String(r!.headers['retry-after']), /^\d+$/);
  t.true(s.api.limits.httpLoad >= 1);
  // The total (50 ms a second) is not spent by one client (5 ms): another address is served…
  const other = await rawRequest(s.api.port, { localAddress: '127.0.0.3', path: '/api/devices?limit=1' });
  t.is(other.status, 200);
  // …until clients together spend it.
  const busy = await until((i) => `127.0.1.${1 + (i % 200)}`, 503);
  t.is(busy?.status, 503);
  t.regex(busy!.body.error, /the server is busy: its HTTP clients together used their share of its time \(http\.maxLoad 0\.05;/);
});

test('sockets: per address and in total; when full, the longest idle one makes room; idle ones time out', async (t) => {
  const s = await start(t, { maxConnections: 8, maxConnectionsPerAddress: 4, headersTimeout: 1000, requestTimeout: 2000 });
  const open = async (localAddress: string) => {
    const sock = net.connect({ host: '127.0.0.1', port: s.api.port, localAddress });
    sock.on('error', () => {});
    const closed = new Promise<string>((r) => {
      let got = '';
      sock.on('data', (d) => (got += d));
      sock.once('close', () => r(got));
    });
    await new Promise<void>((r) => sock.once('connect', () => r()));
    return { sock, closed, gone: false };
  };
  const a = [];
  for (let i = 0; i < 4; i++) a.push(await open('127.0.0.2'));
  await waitFor('the server to count 4 sockets', () => (s.api as any).openSockets === 4);
  const fifth = await open('127.0.0.2');
  t.is(await fifth.closed, '', 'the 5th from one address is closed at once, unanswered');
  for (let i = 0; i < 4; i++) a.push(await open('127.0.0.3'));
  await waitFor('the server to count 8 sockets', () => (s.api as any).openSockets === 8);
  // Full of idle sockets: a real request still gets through, and the oldest idle socket is the one closed.
  const r = await rawRequest(s.api.port, { localAddress: '127.0.0.4' });
  t.is(r.status, 200);
  t.is(await a[0].closed, '', 'the longest idle socket made room');
  t.true(s.api.limits.httpConnections >= 2);
  // The rest get a 408 at headersTimeout (checked every 250 ms here).
  for (const c of a.slice(1)) t.regex(await c.closed, /^HTTP\/1\.1 408/);
});

test('a body over 64 KiB gets 400 with JSON and the socket is closed, even at 17 MiB or sent in chunks', async (t) => {
  const s = await start(t);
  await s.device('lamp-1');
  const url = `${s.base}/api/devices/lamp-1/messages`;
  const big = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: Buffer.alloc(17 * 1024 * 1024, 0x20) });
  t.is(big.status, 400);
  t.is(big.headers.get('connection'), 'close');
  t.regex(((await big.json()) as { error: string }).error, /the body is 17825792 bytes; the limit is 65536 bytes/);
  const chunked = await new Promise<{ status: number; body: any }>((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port: s.api.port, path: '/api/devices/lamp-1/messages', method: 'POST', headers: { 'content-type': 'application/json' }, agent: false }, (res) => {
      let text = '';
      res.on('data', (d) => (text += d));
      res.on('end', () => resolve({ status: res.statusCode!, body: JSON.parse(text) }));
    });
    req.on('error', reject);
    const chunk = Buffer.alloc(16 * 1024, 0x20);
    for (let i = 0; i < 8; i++) req.write(chunk); // no Content-Length: chunked, 128 KiB
    req.end();
  });
  t.is(chunked.status, 400);
  t.regex(chunked.body.error, /the body is over 65536 bytes/);
  t.is((await post(url, { line: 'after' })).status, 200, 'the API carries on');
});
