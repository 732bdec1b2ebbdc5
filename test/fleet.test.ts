/**
 * The Fleet library against a real Server and real Node Clients over 127.0.0.1:
 * types (globs and self-declared ID lines), listing, sending with outcomes,
 * events, and apps bound to a type.
 */
import test, { ExecutionContext } from 'ava';
import { once } from 'node:events';
import * as net from 'node:net';
import { AppRunner, LoadedApp } from '../src/apps';
import { resolveConfig } from '../src/config';
import { Client } from '../src/client';
import type { Connection } from '../src/connection';
import { DeviceInfo, FANOUT_SLICE, Fleet, FleetBusyError, globMatcher } from '../src/fleet';
import { silentLogger } from '../src/log';
import { Server } from '../src/server';
import { RawPeer } from './helpers/raw';
import { waitFor } from './helpers/wait';

const T = 1000;
const bounded = () => ({ signal: AbortSignal.timeout(10_000) });

async function setup(t: ExecutionContext, types: Record<string, string[]> = {}) {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: T, settleDelay: 0, idLineTypes: true, logger: silentLogger });
  const fleet = new Fleet(server, types);
  t.teardown(() => server.close());
  /** A Node device, connected; `idLine` may carry ##type##{json}. */
  const device = async (idLine: string): Promise<Client> => {
    const c = new Client({ id: idLine, port: server.port, timeout: T, retryMin: 100, retryMax: 500 });
    t.teardown(() => c.close());
    await c.connect();
    return c;
  };
  return { server, fleet, device };
}

async function goDown(conn: Connection, client: Client): Promise<void> {
  const down = once(conn, 'down', bounded());
  client.close();
  await down;
}

test('globMatcher: exact IDs, * and ?, regex characters taken literally', (t) => {
  t.true(globMatcher('lamp-*')('lamp-12'));
  t.false(globMatcher('lamp-*')('xlamp-1'));
  t.true(globMatcher('s?')('s1'));
  t.false(globMatcher('s?')('s12'));
  t.true(globMatcher('a.b')('a.b'));
  t.false(globMatcher('a.b')('axb'));
  t.true(globMatcher('(x)*')('(x)1'));
});

test('types come from the config patterns, first match wins, unmatched devices have none', async (t) => {
  const { fleet, device } = await setup(t, { lamp: ['lamp-*', 'desk'], sensor: ['s?'], any: ['*'] });
  await Promise.all(['lamp-1', 'lamp-2', 'desk', 's1', 'other'].map(device));
  const byId = Object.fromEntries(fleet.list().map((d) => [d.id, d.type]));
  t.deepEqual(byId, { 'lamp-1': 'lamp', 'lamp-2': 'lamp', desk: 'lamp', s1: 'sensor', other: 'any' });
  t.deepEqual(fleet.idsOfType('lamp').sort(), ['desk', 'lamp-1', 'lamp-2']);
  t.is(fleet.typeOf('never-seen-lamp'), 'any', 'typeOf works for IDs not yet connected');

  const { fleet: f2, device: d2 } = await setup(t, { lamp: ['lamp-*'] });
  await d2('plain');
  t.is(f2.info('plain')!.type, null);
});

test('a device declares its type and metadata in its ID line (id##type##{json}), over the config', async (t) => {
  const { server, fleet, device } = await setup(t, { lamp: ['therm-*'] });
  await device('therm-1##thermostat##{"room":"kitchen","fw":3,"tags":["a"]}');
  await device('therm-2##thermostat');
  const conn = server.get('therm-1');
  t.truthy(conn, 'the client ID is the part before the first ##');
  t.is(server.get('therm-1##thermostat##{"room":"kitchen","fw":3,"tags":["a"]}'), undefined);
  const info = fleet.info('therm-1')!;
  t.is(info.type, 'thermostat', 'the declared type wins over the config pattern');
  t.deepEqual(info.meta, { room: 'kitchen', fw: 3, tags: ['a'] });
  t.is(info.status, 'up');
  t.regex(info.remote!, /^tcp:127\.0\.0\.1:\d+$/);
  t.true(info.lastSeen! > 0);
  t.deepEqual(fleet.info('therm-2')!.meta, {});
  t.is(fleet.info('therm-2')!.type, 'thermostat');
  t.deepEqual(fleet.idsOfType('thermostat').sort(), ['therm-1', 'therm-2']);
});

test('a bad declared ID line is refused and counted as badId; the server carries on', async (t) => {
  const { server, fleet, device } = await setup(t);
  const lines = ['x##thermostat##{not json\n', '##lamp\n', 'y##\n', 'z##lamp##[1,2]\n'];
  for (const line of lines) {
    const peer = await RawPeer.connect(server.port);
    peer.socket.write(line);
    await Promise.race([peer.closed, new Promise((_, rej) => setTimeout(() => rej(new Error(`not closed after ${line}`)), 10_000))]);
  }
  t.is(server.handshakes.badId, lines.length);
  t.is(server.handshakes.accepted, 0);
  t.deepEqual(fleet.list(), []);
  await device('ok##lamp##{"v":1}');
  t.is(fleet.info('ok')!.type, 'lamp');
});

test('list filters by type and status; info of an unknown ID is undefined', async (t) => {
  const { server, fleet, device } = await setup(t, { lamp: ['lamp-*'], sensor: ['sensor-*'] });
  await device('lamp-1');
  const l2 = await device('lamp-2');
  await device('sensor-1');
  await goDown(server.get('lamp-2')!, l2);
  const ids = (ds: DeviceInfo[]) => ds.map((d) => d.id).sort();
  t.deepEqual(ids(fleet.list()), ['lamp-1', 'lamp-2', 'sensor-1']);
  t.deepEqual(ids(fleet.list({ type: 'lamp' })), ['lamp-1', 'lamp-2']);
  t.deepEqual(ids(fleet.list({ status: 'down' })), ['lamp-2']);
  t.deepEqual(ids(fleet.list({ type: 'lamp', status: 'up' })), ['lamp-1']);
  t.deepEqual(fleet.list({ type: 'nothing' }), []);
  t.is(fleet.info('nope'), undefined);
  const d = fleet.info('lamp-2')!;
  t.is(d.status, 'down');
  t.is(d.remote, null);
  t.is(d.counters.outages, 1);
});

test('send: delivered once ACKed, accepted once queued, failed on timeout while the device is down', async (t) => {
  const { server, fleet, device } = await setup(t);
  const a = await device('a');
  t.deepEqual(await fleet.send('a', 'hello'), { id: 'a', status: 'delivered' });
  t.is(await a.readline(), 'hello\n');
  t.deepEqual(await fleet.send('a', 'queued', { accepted: true }), { id: 'a', status: 'accepted' });
  t.is(await a.readline(), 'queued\n', 'an accepted line is still delivered');

  const b = await device('b');
  await goDown(server.get('b')!, b);
  const started = Date.now();
  const out = await fleet.send('b', 'lost', { timeout: 300 });
  t.is(out.status, 'failed');
  t.is(out.id, 'b');
  t.regex(out.error!, /not acknowledged within 300 ms \(device down\)/);
  t.true(Date.now() - started >= 290, 'it waited for the timeout');

  const none = await fleet.send('ghost', 'x');
  t.is(none.status, 'failed');
  t.regex(none.error!, /no such device/);
  const empty = await fleet.send('a', '');
  t.is(empty.status, 'failed', 'a payload the protocol refuses is a failed outcome, not a throw');
});

test('sendType and sendAll report one outcome per recipient', async (t) => {
  const { server, fleet, device } = await setup(t, { lamp: ['lamp-*'] });
  const l1 = await device('lamp-1');
  const l2 = await device('lamp-2');
  const l3 = await device('lamp-3');
  const s = await device('sensor-1');
  await goDown(server.get('lamp-3')!, l3);

  const outcomes = await fleet.sendType('lamp', 'on', { timeout: 500 });
  const byId = Object.fromEntries(outcomes.map((o) => [o.id, o.status]));
  t.deepEqual(byId, { 'lamp-1': 'delivered', 'lamp-2': 'delivered', 'lamp-3': 'failed' });
  t.is(await l1.readline(), 'on\n');
  t.is(await l2.readline(), 'on\n');
  t.is(s.buffered, 0, 'the sensor got nothing');
  t.deepEqual(await fleet.sendType('nothing', 'x'), []);

  const all = await fleet.sendAll('ping', { timeout: 500 });
  t.deepEqual(all.map((o) => o.id).sort(), ['lamp-1', 'lamp-2', 'lamp-3', 'sensor-1']);
  t.deepEqual(all.filter((o) => o.status === 'delivered').map((o) => o.id).sort(), ['lamp-1', 'lamp-2', 'sensor-1']);
  t.regex(all.find((o) => o.id === 'lamp-3')!.error!, /not acknowledged within 500 ms/);
  t.is(await s.readline(), 'ping\n');

  const queued = await fleet.sendAll('later', { accepted: true });
  t.true(queued.every((o) => o.status === 'accepted'), 'accepted: true answers without waiting, even for a device that is down');
});

test('events: connect, disconnect, message and their name:type variants', async (t) => {
  const { fleet, device } = await setup(t, { lamp: ['lamp-*'] });
  const seen: string[] = [];
  for (const ev of ['connect', 'disconnect', 'message', 'connect:lamp', 'message:lamp', 'disconnect:lamp', 'message:sensor']) {
    fleet.on(ev, (d: DeviceInfo, arg?: string) => seen.push(`${ev} ${d.id}${arg !== undefined ? ' ' + arg : ''}`));
  }
  const connected = once(fleet, 'connect:lamp', bounded());
  const lamp = await device('lamp-1');
  const [info] = (await connected) as [DeviceInfo];
  t.is(info.id, 'lamp-1');
  t.is(info.status, 'up');

  const msg = once(fleet, 'message:lamp', bounded());
  await lamp.write('{"on":true}');
  const [d, line] = (await msg) as [DeviceInfo, string];
  t.is(d.id, 'lamp-1');
  t.is(line, '{"on":true}', 'the line comes without its \\n');

  const plain = await device('other');
  const gotPlain = once(fleet, 'message', bounded());
  await plain.write('hi');
  t.is(((await gotPlain) as [DeviceInfo])[0].id, 'other');

  const gone = once(fleet, 'disconnect:lamp', bounded());
  lamp.close();
  const [dd, reason] = (await gone) as [DeviceInfo, string];
  t.is(dd.id, 'lamp-1');
  t.is(typeof reason, 'string');

  t.true(seen.includes('connect lamp-1'));
  t.true(seen.includes('connect other'));
  t.false(seen.includes('connect:lamp other'), 'a device without the type fires no typed event');
  t.false(seen.some((s) => s.startsWith('message:sensor')));
  t.true(seen.includes('message lamp-1 {"on":true}'));
  t.true(seen.includes('disconnect lamp-1 ' + reason));
});

test('telemetry recorded on a Connection shows in info and fires telemetry events', async (t) => {
  const { server, fleet, device } = await setup(t, { sensor: ['s-*'] });
  await device('s-1');
  const ev = once(fleet, 'telemetry:sensor', bounded());
  server.get('s-1')!.record('temp', 21.5, 1000);
  const [d, name, value, time] = (await ev) as [DeviceInfo, string, number, number];
  t.deepEqual([d.id, name, value, time], ['s-1', 'temp', 21.5, 1000]);
  t.deepEqual(fleet.info('s-1')!.telemetry, { temp: { t: 1000, value: 21.5 } });
});

test('an app bound to a type runs for matching devices only, declared or configured', async (t) => {
  const { server, fleet, device } = await setup(t, { lamp: ['lamp-*'] });
  await device('lamp-early'); // connected before the app is added
  const started: string[] = [];
  const app: LoadedApp = {
    name: 'lamp-app',
    file: 'lamp-app.ts',
    clients: '*',
    type: 'lamp',
    run: async (conn, ctx) => {
      started.push(conn.id);
      await new Promise((r) => ctx.signal.addEventListener('abort', r, { once: true }));
    },
  };
  const runner = new AppRunner(server, silentLogger, fleet);
  t.teardown(() => runner.close());
  runner.add(app);
  await device('lamp-1');
  await device('sensor-1');
  await device('x##lamp##{"declared":true}');
  await device('y##sensor');
  await waitFor('the lamp apps to start', () => started.length >= 3);
  // Every device above has its Connection now, and the runner decides synchronously when one appears.
  t.deepEqual(started.sort(), ['lamp-1', 'lamp-early', 'x']);
  t.throws(() => new AppRunner(server, silentLogger).add(app), { message: /needs the fleet/ });
});

// ---- bounded sends (issue 14 item 5) ------------------------------------------------

/** Devices that connected once and are down now (their Connections exist): raw sockets that say their ID and leave. */
async function downDevices(server: Server, ids: string[]): Promise<void> {
  for (let i = 0; i < ids.length; i += 100) {
    const batch = ids.slice(i, i + 100);
    await Promise.all(
      batch.map(
        (id) =>
          new Promise<void>((resolve, reject) => {
            const s = net.connect({ host: '127.0.0.1', port: server.port }, () => s.write(id + '\n'));
            s.once('data', () => s.destroy()); // the server's greeting: the link was attached
            s.once('close', () => resolve());
            s.once('error', reject);
          }),
      ),
    );
    await waitFor('a batch of devices to be down', () => batch.every((id) => server.get(id)?.state === 'down'));
  }
}

/** A device that comes back on a raw socket and ACKs every message; resolves with the first `n` payloads it got. */
async function comeBackAndRead(server: Server, id: string, n: number): Promise<string[]> {
  const peer = await RawPeer.hello(server.port, id, '\n'); // a keepalive: the server sends messages once the device has spoken
  const got: string[] = [];
  try {
    while (got.length < n) {
      const { line } = await peer.next(10_000);
      got.push(line.slice(2));
      peer.send(line.slice(0, 2) + '\n');
    }
  } finally {
    peer.close();
  }
  return got;
}

test('sends are bounded by what they hold: past maxPendingSends a broadcast is refused whole (ERR_BUSY), a send fails with that code; outcomes give the shares back', async (t) => {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: T, settleDelay: 0, logger: silentLogger });
  t.teardown(() => server.close());
  const fleet = new Fleet(server, {}, { maxPendingSends: 10 });
  const ids = ['d0', 'd1', 'd2', 'd3'];
  await downDevices(server, ids);

  const first = fleet.sendAll('one', { timeout: 60_000 });
  const second = fleet.sendAll('two', { timeout: 60_000 });
  t.deepEqual(fleet.pendingSends, { sends: 8, bytes: 24 }, 'a broadcast holds one send per device');
  const err = await t.throwsAsync(fleet.sendAll('three', { timeout: 60_000 }), { instanceOf: FleetBusyError });
  t.is(err!.code, 'ERR_BUSY');
  t.regex(err!.message, /nothing was sent: 8 sends are waiting for devices and this one needs 4 more \(maxPendingSends 10\)\. Retry once some are answered/);
  t.deepEqual(fleet.pendingSends, { sends: 8, bytes: 24 });
  for (const id of ids) t.is(server.get(id)!.queuedWrites, 2, `${id}: nothing of the refused broadcast was queued`);

  const fits = [fleet.send('d0', 'x', { timeout: 60_000 }), fleet.send('d1', 'y', { timeout: 60_000 })];
  const busy = await fleet.send('d2', 'z');
  t.is(busy.status, 'failed', 'send() never throws: busy is an outcome');
  t.is(busy.code, 'ERR_BUSY');
  t.regex(busy.error!, /10 sends are waiting for devices and this one needs 1 more/);
  t.deepEqual(fleet.pendingSends, { sends: 10, bytes: 26 });

  // The devices come back: everything admitted arrives, in call order, and the shares are free again.
  const got = await Promise.all(ids.map((id) => comeBackAndRead(server, id, id === 'd0' || id === 'd1' ? 3 : 2)));
  t.deepEqual(got, [['one', 'two', 'x'], ['one', 'two', 'y'], ['one', 'two'], ['one', 'two']]);
  const outcomes = [...(await first), ...(await second), ...(await Promise.all(fits))];
  t.true(outcomes.every((o) => o.status === 'delivered'), JSON.stringify(outcomes));
  t.deepEqual(fleet.pendingSends, { sends: 0, bytes: 0 });
  const again = await fleet.sendAll('four', { timeout: 100 });
  t.is(again.length, 4, 'admitted again once the shares were given back');
  t.deepEqual(fleet.pendingSends, { sends: 0, bytes: 0 }, 'a timeout gives the share back too');
});

test('sends are bounded by bytes too (maxPendingBytes, counted per device); the options are validated', async (t) => {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: T, settleDelay: 0, logger: silentLogger });
  t.teardown(() => server.close());
  const fleet = new Fleet(server, {}, { maxPendingBytes: 2048 });
  await downDevices(server, ['b0', 'b1', 'b2', 'b3']);
  const line = 'L'.repeat(600);
  await t.throwsAsync(fleet.sendAll(line), {
    instanceOf: FleetBusyError,
    message: /nothing was sent: 0 bytes of lines are waiting for devices and this one needs 2\.3 KiB more \(maxPendingBytes 2\.0 KiB\)/,
  });
  t.deepEqual(fleet.pendingSends, { sends: 0, bytes: 0 });
  const three = fleet.sendType('nothing', line); // no device: nothing to hold
  t.deepEqual(await three, []);
  const one = fleet.send('b0', line, { timeout: 200 });
  t.deepEqual(fleet.pendingSends, { sends: 1, bytes: 600 });
  t.is((await one).code, 'ERR_ABORTED');
  t.deepEqual(fleet.pendingSends, { sends: 0, bytes: 0 });

  t.throws(() => new Fleet(server, {}, { maxPendingSends: 0 }), { message: /option maxPendingSends must be an integer from 1/ });
  // The same keys in the config file, with the same defaults.
  t.like(resolveConfig({}), { maxPendingSends: 100_000, maxPendingBytes: 64 * 1024 * 1024 });
  t.throws(() => resolveConfig({ maxPendingSends: 0, maxPendingBytes: '1 MB' }), {
    message: /"maxPendingSends" must be an integer from 1 to 100000000, got 0; "maxPendingBytes" must be an integer from 1024/,
  });
  t.throws(() => new Fleet(server, {}, { maxPendingBytes: 1.5 }), { message: /option maxPendingBytes must be an integer from 1024/ });
  await t.throwsAsync(fleet.sendAll('x', { timeout: -1 }), { message: /option timeout must be an integer from 1 to 2147483647/ });
  await t.throwsAsync(fleet.send('b0', 'x', { timeout: Infinity }), { message: /option timeout must be an integer/ });
});

test('a broadcast to a big fleet is addressed in slices, in call order: a later send to a device comes after the broadcast', async (t) => {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: T, settleDelay: 0, logger: silentLogger });
  t.teardown(() => server.close());
  const fleet = new Fleet(server);
  const n = FANOUT_SLICE + 200;
  const ids = Array.from({ length: n }, (_, i) => `dev-${i}`);
  await downDevices(server, ids);
  const last = ids[n - 1];

  const all = fleet.sendAll('A', { timeout: 60_000 });
  // The first slice is addressed at once, the rest in later turns of the event loop.
  t.is(server.get(ids[0])!.queuedWrites, 1);
  t.is(server.get(last)!.queuedWrites, 0, 'beyond the first slice: not addressed yet');
  t.deepEqual(fleet.pendingSends, { sends: n, bytes: n }, 'but its share is held from the call');
  const single = fleet.send(last, 'B', { timeout: 60_000 });
  t.deepEqual(await comeBackAndRead(server, last, 2), ['A', 'B'], 'the broadcast first, then the send, as they were called');
  t.is((await single).status, 'delivered');
  await waitFor('every device to be addressed', () => ids.every((id) => server.get(id)!.queuedWrites + server.get(id)!.inFlight >= (id === last ? 0 : 1)));
  for (const c of server.connections()) c.close(); // the rest stay down: their writes end with the Connections
  const outcomes = await all;
  t.is(outcomes.length, n);
  t.is(outcomes.find((o) => o.id === last)!.status, 'delivered');
  t.is(outcomes.filter((o) => o.status === 'failed' && o.code === 'ERR_CLOSED').length, n - 1);
  t.deepEqual(fleet.pendingSends, { sends: 0, bytes: 0 });
});
