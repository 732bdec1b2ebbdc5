/**
 * The MicroPython client (clients/micropython/tether_client.py, unmodified) in
 * the real MicroPython 1.27 WebAssembly interpreter, against the real server on
 * 127.0.0.1. Board-only modules (socket, network, machine) are test stand-ins
 * backed by Node (test/micropython/stubs).
 */
import test, { ExecutionContext } from 'ava';
import * as path from 'node:path';
import { AppRunner, loadApp } from '../src/apps';
import { Client, Connection, createLogger, hashSecret, Server, ServerOptions, silentLogger } from '../src';
import { startMicroPython, MicroPython } from './helpers/micropython';
import { ChaosProxy } from '../src/chaos';
import { eventually } from './helpers/raw';
import * as qos from '../qos/qos';

const T = 600;

interface DeviceState {
  up: boolean;
  connects: number;
  dropped: number;
  got: number[];
  sent: number;
}

/** The Python side of each test: a Client plus small helpers the test calls. */
function driver(id: string, port: number, extra = ''): string {
  return `
import asyncio
from tether_client import Client
c = Client(${JSON.stringify(id)}, '127.0.0.1', ${port}, timeout=${T}${extra})
got = []
sent = 0
async def start():
    await c
async def _send(first, n, qos):
    global sent
    for i in range(first, first + n):
        await c.write(str(i), qos)
        sent += 1
def send(first, n, qos=True):
    asyncio.create_task(_send(first, n, qos))
async def _read(n):
    for _ in range(n):
        got.append(int(await c.readline()))
def read(n):
    asyncio.create_task(_read(n))
def state():
    return {'up': c.status(), 'connects': c.connects, 'dropped': c.dropped, 'got': got, 'sent': sent}
`;
}

async function device(t: ExecutionContext, id: string, port: number, extra = ''): Promise<MicroPython> {
  const mp = await startMicroPython();
  t.teardown(() => mp.close());
  await mp.run(driver(id, port, extra));
  return mp;
}

const state = (mp: MicroPython) => mp.call('state') as Promise<DeviceState>;

const until = (what: string, cond: () => Promise<boolean> | boolean, ms = 30_000) => eventually(cond, ms, what, 25);

async function server(t: ExecutionContext, opts: ServerOptions = {}): Promise<Server> {
  const s = await Server.listen({ host: '127.0.0.1', port: 0, timeout: T, logger: silentLogger, ...opts });
  t.teardown(() => s.close());
  return s;
}

async function readN(conn: Connection, n: number, onEach?: (count: number) => void): Promise<number[]> {
  const out: number[] = [];
  while (out.length < n) {
    out.push(Number(await conn.readline()));
    onEach?.(out.length);
  }
  return out;
}

const range = (a: number, n: number) => Array.from({ length: n }, (_, i) => a + i);

test('connects with its ID line; qos messages both ways arrive exactly once, in order', async (t) => {
  const srv = await server(t);
  const mp = await device(t, 'mp-1', srv.port);
  await mp.call('start');
  const conn = await srv.clientConn('mp-1');
  t.true(conn.isUp);
  const N = 100;
  await mp.call('send', 0, N);
  await mp.call('read', N);
  const atServer = readN(conn, N);
  for (let i = 0; i < N; i++) await conn.write(String(i));
  t.deepEqual(await atServer, range(0, N));
  await until('device got everything', async () => (await state(mp)).got.length === N);
  t.deepEqual((await state(mp)).got, range(0, N));
  t.is(conn.counters.duplicatesDropped, 0);
  t.is(conn.counters.badLines, 0);
});

test('outages (abrupt cut and silent blackhole): the client reconnects and nothing is lost or doubled', async (t) => {
  const srv = await server(t, { settleDelay: 50 });
  const proxy = await ChaosProxy.start({ targetPort: srv.port });
  t.teardown(() => proxy.close());
  const mp = await device(t, 'mp-2', proxy.port);
  await mp.call('start');
  const conn = await srv.clientConn('mp-2');
  const N = 120;
  let faults = 0;
  await mp.call('send', 0, N);
  await mp.call('read', N);
  const atServer = readN(conn, N, (k) => {
    if (k % 30 === 0 && k < N) {
      if (faults++ % 2 === 0) proxy.cut();
      else proxy.blackhole();
    }
  });
  for (let i = 0; i < N; i++) await conn.write(String(i));
  t.deepEqual(await atServer, range(0, N));
  await until('device got everything', async () => (await state(mp)).got.length === N, 60_000);
  const s = await state(mp);
  t.deepEqual(s.got, range(0, N));
  t.true(faults >= 3);
  t.true(s.connects >= faults + 1, `device reconnected ${s.connects - 1} times for ${faults} faults`);
  t.log(`faults ${faults} (cuts ${proxy.injected.cut}, blackholes ${proxy.injected.blackhole}); device connects ${s.connects}; server outages ${conn.counters.outages}, retransmits ${conn.counters.retransmits}, dupes dropped ${conn.counters.duplicatesDropped}`);
});

test('server restart: the client reconnects to the new server and its pending messages get through', async (t) => {
  const first = await Server.listen({ host: '127.0.0.1', port: 0, timeout: T, logger: silentLogger });
  const port = first.port;
  const mp = await device(t, 'mp-3', port);
  await mp.call('start');
  const c1 = await first.clientConn('mp-3');
  await mp.call('send', 0, 10);
  t.deepEqual(await readN(c1, 10), range(0, 10));
  await until('all 10 ACKed', async () => (await state(mp)).sent === 10);
  await first.close();
  await until('device sees the outage', async () => !(await state(mp)).up);
  // Written while no server runs: they wait for the link.
  await mp.call('send', 10, 10);
  const second = await server(t, { port });
  const c2 = await second.clientConn('mp-3');
  t.deepEqual(await readN(c2, 10), range(10, 10));
  await c2.write('hello again');
  t.is(await mp.eval('c.readline()'), 'hello again\n');
  t.true((await state(mp)).connects >= 2);
});

test('receive queue full: further messages are refused without ACK and arrive later, once, in order', async (t) => {
  const srv = await server(t, { settleDelay: 0 });
  const mp = await device(t, 'mp-4', srv.port, ', rxq=5');
  await mp.call('start');
  const conn = await srv.clientConn('mp-4');
  const N = 12;
  const writes = (async () => {
    for (let i = 0; i < N; i++) await conn.write(String(i));
  })();
  await until('queue overflow', async () => (await state(mp)).dropped > 0);
  await eventually(() => conn.counters.retransmits > 0, 10 * T, 'the server resends what was refused');
  t.true(conn.isUp, 'the link stays up (the original dropped it)');
  await mp.call('read', N);
  await writes;
  await until('device read all', async () => (await state(mp)).got.length === N);
  t.deepEqual((await state(mp)).got, range(0, N));
  t.log(`refused ${(await state(mp)).dropped} times, server retransmits ${conn.counters.retransmits}`);
});

test('a write during an outage waits for the link and is delivered once', async (t) => {
  const srv = await server(t, { settleDelay: 0 });
  const proxy = await ChaosProxy.start({ targetPort: srv.port });
  t.teardown(() => proxy.close());
  const mp = await device(t, 'mp-5', proxy.port);
  await mp.call('start');
  const conn = await srv.clientConn('mp-5');
  proxy.blackhole();
  await until('device sees the outage', async () => !(await state(mp)).up, 10 * T);
  await mp.call('send', 7, 1);
  t.is(await conn.readline(), '7\n');
  await until('write completed', async () => (await state(mp)).sent === 1);
  await new Promise((r) => setTimeout(r, 2 * T));
  t.is(conn.buffered, 0, 'not delivered twice');
});

test('empty lines and lines with a newline inside are refused with ValueError', async (t) => {
  const srv = await server(t);
  const mp = await device(t, 'mp-6', srv.port);
  await mp.call('start');
  await mp.run(`
errs = []
for bad in ('', '\\n', 'a\\nb'):
    try:
        await c.write(bad)
    except ValueError as e:
        errs.append(str(e))
await c.write('fine\\n')
`);
  const errs = (await mp.eval('errs')) as string[];
  t.is(errs.length, 3);
  t.regex(errs[0], /empty/);
  t.regex(errs[2], /newline/);
  const conn = await srv.clientConn('mp-6');
  t.is(await conn.readline(), 'fine\n');
});

test('heartbeat LED and watchdog: toggled on keepalives, fed by the client loops', async (t) => {
  const srv = await server(t);
  const mp = await startMicroPython();
  t.teardown(() => mp.close());
  await mp.run(`
from machine import Pin
from tether_client import Client
c = Client('mp-7', '127.0.0.1', ${srv.port}, timeout=${T}, led=Pin(2, Pin.OUT), wdog=True)
await c
`);
  await until('keepalives toggle the LED', () => (mp.pins['2']?.toggles ?? 0) >= 4, 10 * T);
  t.true(mp.wdtFeeds.length > 10);
  t.is(mp.wdtTimeoutMs, 20000);
});

test('the device half of examples/json-exchange.ts talks to its server half', async (t) => {
  const lines: Array<Record<string, unknown>> = [];
  const log = createLogger({ level: 'info', sink: (r) => lines.push(r) });
  const srv = await server(t, { logger: log });
  const runner = new AppRunner(srv, log);
  runner.add(loadApp(path.join(__dirname, '..', 'examples', 'json-exchange.ts'), ['1']));
  t.teardown(() => runner.close());
  const mp = await startMicroPython();
  t.teardown(() => mp.close());
  await mp.run(`
import sys
sys.path.append('/lib/examples')
import asyncio, json_exchange
from tether_client import Client
json_exchange.PERIOD_MS = 100
c = Client('1', '127.0.0.1', ${srv.port}, timeout=${T})
asyncio.create_task(json_exchange.main(c, 3))
`);
  await until('the app got 3 reports', () => lines.filter((r) => r.msg === 'app got').length >= 3);
  const got = lines.filter((r) => r.msg === 'app got').map((r) => r.count);
  t.deepEqual(got.slice(0, 3), [0, 1, 2]);
  await mp.waitForLine(/^got \[0, /, 10_000);
});

test('the MicroPython qos demo (examples/qos.py) swaps numbered messages with the server half of qos/qos.ts', async (t) => {
  qos.settings.periodMs = 50;
  qos.settings.printEveryMs = 0;
  const srv = await server(t);
  const runner = new AppRunner(srv, silentLogger);
  runner.add(loadApp(path.join(__dirname, '..', 'qos', 'qos.ts'), ['mp-qos']));
  t.teardown(() => runner.close());
  const mp = await startMicroPython();
  t.teardown(() => mp.close());
  await mp.run(`
import sys
sys.path.append('/lib/examples')
import asyncio, qos
from tether_client import Client
qos.PERIOD_MS = 50
qos.PRINT_MS = 200
c = Client('mp-qos', '127.0.0.1', ${srv.port}, timeout=${T})
asyncio.create_task(qos.main(c, 10))
`);
  const atServer = qos.atServer.peer('mp-qos');
  await until('the server half got the 10 messages', () => atServer.received >= 10);
  await until('the board got 10 from the server half, and its 10 were ACKed', async () => {
    const b = (await mp.eval('qos.stats.state()')) as Record<string, number>;
    return b.received >= 10 && b.sent === 10;
  });
  t.like(atServer, { received: 10, duplicates: 0, outOfOrder: 0, restarts: 0, invalid: 0, last: 9 });
  t.is(atServer.missing, 0);
  const board = (await mp.eval('qos.stats.state()')) as Record<string, number>;
  t.like(board, { sent: 10, duplicates: 0, missing: 0, out_of_order: 0, restarts: 0, invalid: 0 });
  t.regex(atServer.boot ?? '', /^[0-9a-f]{8}$/, "the board's run id reached the server");
  await mp.waitForLine(/^qos: sent \d+ received \d+ dupes 0 missing 0 out-of-order 0 restarts 0 invalid 0 connects 1$/, 5000);
});

test('RAM: what the client costs in a 32-bit MicroPython heap', async (t) => {
  const srv = await server(t);
  const mp = await startMicroPython({ heapsize: 256 * 1024 });
  t.teardown(() => mp.close());
  await mp.run(`
import gc
gc.collect()
base = gc.mem_alloc()
from tether_client import Client
gc.collect()
imported = gc.mem_alloc() - base
c = Client('mp-8', '127.0.0.1', ${srv.port}, timeout=${T})
await c
for i in range(20):
    await c.write('message %d' % i)
gc.collect()
running = gc.mem_alloc() - base - imported
`);
  const conn = await srv.clientConn('mp-8');
  t.is(conn.counters.messagesIn, 20);
  const imported = (await mp.eval('imported')) as number;
  const running = (await mp.eval('running')) as number;
  t.log(`RAM: import from source ${imported} bytes; one Client linked and after 20 qos writes ${running} bytes`);
  // Regression guards (see clients/micropython/README.md for the figures and what they mean
  // on an ESP8266, where the code itself should be frozen into the firmware).
  t.true(running < 10000, `a running client holds ${running} bytes`);
  t.true(imported < 24000, `import holds ${imported} bytes`);
});

test('remote control: a Node "tx" button drives the MicroPython "rx" LED through the server app', async (t) => {
  const srv = await server(t);
  const runner = new AppRunner(srv, silentLogger);
  runner.add(loadApp(path.join(__dirname, '..', 'examples', 'remote-control.ts')));
  t.teardown(() => runner.close());
  const mp = await startMicroPython();
  t.teardown(() => mp.close());
  await mp.run(`
import sys
sys.path.append('/lib/examples')
import asyncio, remote_rx
from machine import Pin
from tether_client import Client
asyncio.create_task(remote_rx.main(Client('rx', '127.0.0.1', ${srv.port}, timeout=${T}), Pin(2, Pin.OUT)))
`);
  const tx = new Client({ id: 'tx', port: srv.port, timeout: T });
  t.teardown(() => tx.close());
  await tx.connect();
  const rx = await srv.clientConn('rx');
  const reports: string[] = [];
  rx.on('line', (l: string) => reports.push(l.trimEnd()));
  await tx.write(JSON.stringify({ button: 'down' }));
  await until('LED on', () => mp.pins['2']?.value === 1);
  await tx.write(JSON.stringify({ button: 'up' }));
  await until('LED off', () => mp.pins['2']?.value === 0 && reports.length === 2);
  t.deepEqual(reports, ['{"led": "on"}', '{"led": "off"}']);
});

test('WiFi loss: the client notices the outage, rejoins WiFi (ESP32: ssid/pw) and resumes', async (t) => {
  const srv = await server(t, { settleDelay: 0 });
  const proxy = await ChaosProxy.start({ targetPort: srv.port });
  t.teardown(() => proxy.close());
  const mp = await startMicroPython({ wifi: { storedCredentials: false } });
  t.teardown(() => mp.close());
  await mp.run(driver('mp-9', proxy.port, ", ssid='lab', pw='secret'"));
  await mp.call('start');
  const joinsBefore = mp.wifi.connects;
  t.true(joinsBefore >= 1, 'joined with ssid/pw');
  // The access point vanishes: no packets either way.
  mp.wifi.setUp(false);
  proxy.blackhole();
  await until('device sees the outage', async () => !(await state(mp)).up, 10 * T);
  await mp.call('send', 1, 1);
  await new Promise((r) => setTimeout(r, 3 * T));
  t.false((await state(mp)).up, 'no link while WiFi is down');
  mp.wifi.setUp(true);
  const conn = await srv.clientConn('mp-9');
  t.is(await conn.readline(), '1\n');
  t.true(mp.wifi.connects > joinsBefore, 'it called WLAN.connect() again');
});

test('Client.from_config reads a local.json-style file; arguments override it', async (t) => {
  const srv = await server(t);
  const mp = await startMicroPython({
    files: { '/local.json': JSON.stringify({ id: 'from-file', server: '127.0.0.1', port: srv.port, timeout: T }) },
  });
  t.teardown(() => mp.close());
  await mp.run(`
import os
from tether_client import Client
os.chdir('/')
c = Client.from_config('local.json')
await c
d = Client.from_config('local.json', my_id='override')
await d
`);
  t.truthy(await srv.clientConn('from-file'));
  t.truthy(await srv.clientConn('override'));
});

test('auth: the unmodified client authenticates with "id@secret" as its client ID; a wrong secret gets nothing', async (t) => {
  const srv = await server(t, { auth: { devices: { 'mp-auth': hashSecret('board-secret-123') }, maxFailures: 100 } });
  const mp = await device(t, 'mp-auth@board-secret-123', srv.port);
  await mp.call('start');
  const conn = await srv.clientConn('mp-auth');
  t.true(conn.isUp);
  await mp.call('send', 0, 3);
  t.deepEqual(await readN(conn, 3), range(0, 3));
  // The same client code with the same ID and a wrong secret is refused before the duplicate-ID check.
  const remote = conn.remote;
  const bad = await device(t, 'mp-auth@wrong-secret-456', srv.port);
  void bad.call('start').catch(() => {});
  await until('the wrong secret refused', async () => srv.handshakes.authFailed >= 1);
  t.is(srv.handshakes.duplicateId, 0);
  t.is(conn.remote, remote);
});

// ---- Several gateways (issue 9): a list of servers, failover after N failed attempts

/**
 * A device whose Client gets `servers` (Python source for the server argument)
 * instead of one port. device() makes the driver's helpers and a Client it never
 * starts; `c` is replaced before start(). `cls` may be 'Counting' (below).
 */
async function deviceOn(t: ExecutionContext, id: string, servers: string, extra = '', cls = 'Client'): Promise<MicroPython> {
  const mp = await device(t, id, 0);
  await mp.run(`
tries = []  # self.server at each refused connect (Counting only)
quick = False  # Counting: retry after 20 ms instead of the default backoff
class Counting(Client):
    async def bad_server(self):
        tries.append(self.server)
        if quick:
            await asyncio.sleep_ms(20)
        else:
            await Client.bad_server(self)
async def _paced(first, n, ms):
    global sent
    for i in range(first, first + n):
        await c.write(str(i))
        sent += 1
        await asyncio.sleep_ms(ms)
def paced(first, n, ms):
    asyncio.create_task(_paced(first, n, ms))
c = ${cls}(${JSON.stringify(id)}, ${servers}, timeout=${T}${extra})
`);
  return mp;
}

/** A port on 127.0.0.1 with nothing listening: connects to it are refused. */
async function deadPort(): Promise<number> {
  const s = await Server.listen({ host: '127.0.0.1', port: 0, logger: silentLogger });
  const port = s.port;
  await s.close();
  return port;
}

/** Every line `conn` receives, as numbers, read in the background until it closes. */
function collect(conn: Connection): number[] {
  const out: number[] = [];
  void (async () => {
    for (;;) out.push(Number(await conn.readline()));
  })().catch(() => {});
  return out;
}

const dupesIn = (xs: number[]) => xs.filter((x, i) => xs.indexOf(x) !== i);

test('several gateways: when its server goes for good the client fails over to the next in its list; no qos message is lost', async (t) => {
  const a = await Server.listen({ host: '127.0.0.1', port: 0, timeout: T, logger: silentLogger });
  t.teardown(() => a.close());
  const b = await server(t);
  // A plain host (uses port=) and a (host, port) pair.
  const mp = await deviceOn(t, 'mp-fo-1', `['127.0.0.1', ('127.0.0.1', ${b.port})]`, `, port=${a.port}, verbose=True`);
  await mp.call('start');
  t.deepEqual(await mp.eval('c.server'), ['127.0.0.1', a.port]);
  const connA = await a.clientConn('mp-fo-1');
  const atA = collect(connA);
  await mp.call('read', 5);
  for (let i = 100; i < 105; i++) await connA.write(String(i));
  await until('the device got 5 from A', async () => (await state(mp)).got.length === 5);

  // Numbered qos messages, one every 50 ms, across A's end and the failover.
  const N = 60;
  await mp.call('paced', 0, N, 50);
  await until('A got 10', () => atA.length >= 10);
  const portA = a.port;
  await a.close();
  const closedAt = Date.now();
  // Every message after the one in flight now is written after A's close.
  const firstAfter = (await state(mp)).sent + 1;

  const connB = await b.clientConn('mp-fo-1');
  const failoverMs = Date.now() - closedAt;
  const atB = collect(connB);
  t.deepEqual(await mp.eval('c.server'), ['127.0.0.1', b.port]);
  await mp.waitForLine(`('127.0.0.1', ${portA}) failed 3 times in a row: moving to ('127.0.0.1', ${b.port})`, 5000);

  await until('every message written after A closed is at B', () => range(firstAfter, N - firstAfter).every((i) => atB.includes(i)), 60_000);
  await until('all ACKed', async () => (await state(mp)).sent === N);
  for (let i = firstAfter; i < N; i++) t.true(atB.includes(i), `message ${i} (written after A closed) reached B`);
  for (let i = 0; i < N; i++) t.true(atA.includes(i) || atB.includes(i), `message ${i} reached A or B`);
  // Within one server the duplicate filter holds; across servers a message whose ACK
  // A never sent is sent again to B (qos is at-least-once per gateway).
  t.deepEqual(dupesIn(atA), [], 'no duplicate at A');
  t.deepEqual(dupesIn(atB), [], 'no duplicate at B');
  const both = atB.filter((i) => atA.includes(i));
  t.log(
    `failover to B ${failoverMs} ms after A closed; A got ${atA.length}, B got ${atB.length} (from ${atB[0]}), ` +
      `first written after the close ${firstAfter}; at both A and B: ${both.length ? both.join(', ') : 'none'}; ` +
      `B dropped ${connB.counters.duplicatesDropped} retransmits`,
  );

  // And B reaches the device.
  await mp.call('read', 5);
  for (let i = 200; i < 205; i++) await connB.write(String(i));
  await until('the device got 5 from B', async () => (await state(mp)).got.length === 10);
  t.deepEqual((await state(mp)).got, [...range(100, 5), ...range(200, 5)]);
});

test('failover: with [dead port, live server] the client is on the live one after `failover` refused connects', async (t) => {
  const dead = await deadPort();
  const live = await server(t);
  const mp = await deviceOn(t, 'mp-fo-2', `[('127.0.0.1', ${dead}), '127.0.0.1']`, `, port=${live.port}, failover=2`, 'Counting');
  t.deepEqual(await mp.eval('c.server'), ['127.0.0.1', dead], 'starts with the first');
  await mp.call('start');
  t.deepEqual(await mp.eval('c.server'), ['127.0.0.1', live.port]);
  const tries = (await mp.eval('tries')) as unknown[];
  t.true(tries.length >= 2, `${tries.length} failed attempts before moving on`);
  t.deepEqual(tries, [
    ['127.0.0.1', dead],
    ['127.0.0.1', dead],
  ]);
  const conn = await live.clientConn('mp-fo-2');
  await mp.call('send', 0, 3);
  t.deepEqual(await readN(conn, 3), range(0, 3));
});

test('failover wraps round the list; a gateway that accepts but never brings the link up counts as a failed attempt', async (t) => {
  const dead = await deadPort();
  // A gateway that turns this board away after its ID line (no secret configured for it).
  const gate = await server(t, { auth: { devices: { someone: hashSecret('not-this-board') }, maxFailures: 1000 }, maxStrikes: 0 });
  const mp = await deviceOn(t, 'mp-fo-3', `[('127.0.0.1', ${dead}), ('127.0.0.1', ${gate.port})]`, ', failover=2, verbose=True', 'Counting');
  await mp.run('quick = True\nasyncio.create_task(start())');
  await until('two turns at the gateway', () => gate.handshakes.authFailed >= 2);
  // The first server comes (back) up: the client gets there on its next round.
  const live = await server(t, { port: dead });
  const conn = await live.clientConn('mp-fo-3');
  t.true(conn.isUp);
  t.deepEqual(await mp.eval('c.server'), ['127.0.0.1', dead]);
  const tries = (await mp.eval('tries')) as unknown[];
  t.true(tries.length >= 2);
  const onDead = tries.filter((a) => JSON.stringify(a) === JSON.stringify(['127.0.0.1', dead])).length;
  const onGate = tries.length - onDead;
  t.true(onDead >= 2, 'refused connects on the dead port backed off');
  const turns = gate.handshakes.authFailed;
  // A board turned away after its ID line backs off too, instead of redialling in a tight loop.
  t.is(onGate, turns, 'every attempt the gateway turned away was followed by bad_server()');
  t.true(turns >= 2 && turns % 2 === 0, `the gateway saw ${turns} attempts: whole turns of failover=2`);
  const moves = mp.stdout.filter((l) => l.includes('times in a row: moving to'));
  t.true(moves.length >= 2);
  t.true(moves[0].includes(`('127.0.0.1', ${dead}) failed 2 times in a row: moving to ('127.0.0.1', ${gate.port})`), moves[0]);
  t.true(moves[1].includes(`('127.0.0.1', ${gate.port}) failed 2 times in a row: moving to ('127.0.0.1', ${dead})`), moves[1]);
  t.log(`refused connects ${tries.length}, turned away by the gateway ${turns}, moves ${moves.length}`);
});

test('Client.from_config takes a list of servers (hosts and [host, port] pairs) and failover from the file', async (t) => {
  const dead = await deadPort();
  const srv = await server(t);
  const mp = await startMicroPython({
    files: {
      '/local.json': JSON.stringify({ id: 'cfg-list', server: [['127.0.0.1', dead], '127.0.0.1'], port: srv.port, timeout: T, failover: 1 }),
    },
  });
  t.teardown(() => mp.close());
  await mp.run(`
import os
from tether_client import Client
os.chdir('/')
tries = []
class Counting(Client):
    async def bad_server(self):
        tries.append(self.server)
        await Client.bad_server(self)
c = Counting.from_config('local.json')
first = c.server
await c
`);
  t.deepEqual(await mp.eval('first'), ['127.0.0.1', dead]);
  t.deepEqual(await mp.eval('c.server'), ['127.0.0.1', srv.port]);
  t.deepEqual(await mp.eval('tries'), [['127.0.0.1', dead]], 'failover: 1 from the file');
  t.truthy(await srv.clientConn('cfg-list'));
});

test('server argument: a single host keeps working as before; bad lists are refused at once with ValueError', async (t) => {
  const mp = await startMicroPython();
  t.teardown(() => mp.close());
  await mp.run(`
from tether_client import Client
one = Client('x', '10.0.0.2', 8124).server
pairs = Client('x', ['10.0.0.2', ['10.0.0.3', 8125], ('10.0.0.4', 8126)], 8124)
errs = []
for bad in (None, '', [], [123], [('10.0.0.3',)], [('10.0.0.3', '8124')], ['10.0.0.2', None]):
    try:
        Client('x', bad)
        errs.append(None)
    except ValueError as e:
        errs.append(str(e))
`);
  t.deepEqual(await mp.eval('one'), ['10.0.0.2', 8124]);
  t.deepEqual(await mp.eval('[pairs._addr(i) for i in range(3)]'), [
    ['10.0.0.2', 8124],
    ['10.0.0.3', 8125],
    ['10.0.0.4', 8126],
  ]);
  const errs = (await mp.eval('errs')) as Array<string | null>;
  t.is(errs.length, 7);
  for (const e of errs) t.truthy(e, 'refused with ValueError');
});
