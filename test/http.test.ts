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
import { HttpApi, MAX_BODY, RECENT_CHARS, UPDT_INTERVAL } from '../src/http';
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

interface StartOptions {
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
  for (let i = 1; i < times.length; i++) t.true(times[i] - times[i - 1] >= UPDT_INTERVAL - 50, `gap ${times[i] - times[i - 1]} ms`);
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
  t.throws(() => resolveConfig({ http: { token: '' } }), { message: /"token" is null or a non-empty string/ });
  t.throws(() => resolveConfig({ http: true }), { message: /"http" must be null \(off\) or \{ "host"/ });
});
