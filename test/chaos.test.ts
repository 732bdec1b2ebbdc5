/**
 * ChaosProxy on its own, between two raw sockets on 127.0.0.1: each fault kind,
 * the seeded random schedule, and shutdown.
 */
import test, { ExecutionContext } from 'ava';
import * as net from 'node:net';
import { ChaosProxy, ChaosOptions } from '../src/chaos';
import { eventually } from './helpers/raw';

/** One end of a proxied connection: what it received, chunk by chunk, and when. */
class End {
  readonly chunks: Array<{ at: number; data: string }> = [];
  closed = false;
  constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => this.chunks.push({ at: Date.now(), data: d.toString('latin1') }));
    socket.on('close', () => (this.closed = true));
    socket.on('error', () => {});
  }
  get text(): string {
    return this.chunks.map((c) => c.data).join('');
  }
}

/** A target server, a proxy in front of it, and `n` connections through it. */
async function rig(t: ExecutionContext, n = 1, opts: Partial<ChaosOptions> = {}) {
  const accepted: End[] = [];
  const target = net.createServer((s) => accepted.push(new End(s)));
  await new Promise<void>((r) => target.listen(0, '127.0.0.1', () => r()));
  const proxy = await ChaosProxy.start({ targetPort: (target.address() as net.AddressInfo).port, ...opts });
  t.teardown(async () => {
    await proxy.close();
    for (const e of accepted) e.socket.destroy();
    await new Promise<void>((r) => target.close(() => r()));
  });
  const pairs: Array<{ device: End; server: End }> = [];
  for (let i = 0; i < n; i++) {
    const device = new End(net.connect({ port: proxy.port, host: '127.0.0.1' }));
    t.teardown(() => void device.socket.destroy());
    await new Promise<void>((r) => device.socket.once('connect', () => r()));
    await eventually(() => accepted.length > i, 2000, 'the target accepts');
    pairs.push({ device, server: accepted[i] });
  }
  // (A random schedule may already have hit one.)
  if (!opts.every) await eventually(() => proxy.live === n, 2000, 'every connection is live');
  return { proxy, pairs };
}

test('passes bytes both ways, on 127.0.0.1 by default', async (t) => {
  const { proxy, pairs } = await rig(t);
  const [{ device, server }] = pairs;
  t.is(device.socket.remoteAddress, '127.0.0.1');
  device.socket.write('ping\n');
  await eventually(() => server.text === 'ping\n', 2000, 'device → server');
  server.socket.write('pong\n');
  await eventually(() => device.text === 'pong\n', 2000, 'server → device');
  t.is(proxy.live, 1);
  t.is(proxy.total, 0);
});

test('a close passes through; a cut destroys both sockets of every live connection at once', async (t) => {
  const { proxy, pairs } = await rig(t, 3);
  pairs[0].device.socket.end();
  await eventually(() => pairs[0].server.closed, 2000, 'the close reaches the server side');
  await eventually(() => proxy.live === 2, 2000, 'two left');
  t.is(proxy.cut(), 2);
  await eventually(() => pairs.every((p) => p.device.closed && p.server.closed), 2000, 'all closed');
  t.is(proxy.injected.cut, 2);
  t.is(proxy.live, 0);
});

test('blackhole(ms): nothing passes either way, the sockets stay open, then the pair is cut', async (t) => {
  const { proxy, pairs } = await rig(t);
  const [{ device, server }] = pairs;
  const start = Date.now();
  t.is(proxy.blackhole(300), 1);
  t.is(proxy.live, 0, 'a blackholed connection is not live');
  device.socket.write('lost 1\n');
  server.socket.write('lost 2\n');
  await eventually(() => device.closed && server.closed, 3000, 'cut when the period ends');
  t.true(Date.now() - start >= 250, `cut after ${Date.now() - start} ms`);
  t.is(device.text, '');
  t.is(server.text, '');
  t.deepEqual(proxy.injected, { cut: 0, blackhole: 1, delay: 0, split: 0 });
});

test('blackhole() without ms: a side that closes is not told to the other', async (t) => {
  const { proxy, pairs } = await rig(t);
  const [{ device, server }] = pairs;
  proxy.blackhole();
  device.socket.destroy();
  // The proxy reads the close; write through the other side to show it is still open.
  server.socket.write('anyone?\n');
  await eventually(() => device.closed, 2000, 'device side closed');
  t.false(server.closed, 'the server side hears nothing');
  t.true(server.socket.writable);
});

test('delay(ms, forMs): chunks arrive at least ms late, in order; after forMs they pass at once', async (t) => {
  const { proxy, pairs } = await rig(t);
  const [{ device, server }] = pairs;
  t.is(proxy.delay(150, 400), 1);
  const sentAt: number[] = [];
  for (const word of ['one ', 'two ', 'three ']) {
    sentAt.push(Date.now());
    device.socket.write(word);
    await new Promise((r) => setTimeout(r, 30));
  }
  await eventually(() => server.text === 'one two three ', 3000, 'all delayed chunks arrive, in order');
  t.true(server.chunks[0].at - sentAt[0] >= 140, `first chunk late by ${server.chunks[0].at - sentAt[0]} ms`);
  await eventually(() => Date.now() - sentAt[0] > 450, 2000, 'the delay period is over');
  const before = server.chunks.length;
  const t0 = Date.now();
  device.socket.write('four');
  await eventually(() => server.text.endsWith('four'), 2000, 'after the period');
  t.true(server.chunks.at(-1)!.at - t0 < 140, 'no longer held back');
  t.true(server.chunks.length > before);
  t.is(proxy.injected.delay, 1);
});

test('split(forMs): a chunk is delivered one byte per write, intact', async (t) => {
  const { proxy, pairs } = await rig(t);
  const [{ device, server }] = pairs;
  t.is(proxy.split(2000), 1);
  const msg = '0123456789abcdef\n';
  device.socket.write(msg);
  server.socket.write(msg);
  await eventually(() => server.text === msg && device.text === msg, 3000, 'both arrive whole');
  t.log(`received in ${server.chunks.length} and ${device.chunks.length} reads`);
  // Each byte is its own write on its own turn of the event loop; the reader usually sees them apart.
  t.true(server.chunks.length > 1 && device.chunks.length > 1, 'more than one read each way');
  t.is(proxy.injected.split, 1);
});

test('the random schedule is seeded: same seed, same faults; kinds limited to those asked for', async (t) => {
  const kinds = async (seed: number) => {
    const { proxy } = await rig(t, 1, { seed, every: 10, kinds: ['delay', 'split'], delayMs: 1, delayForMs: 1, splitMs: 1 });
    // A fault that finds no connection yet still takes its turn in the sequence.
    await eventually(() => proxy.recent.length >= 12, 5000, '12 random faults');
    await proxy.close();
    t.true(proxy.recent.slice(0, 12).some((f) => f.conn !== null), 'some hit the connection');
    return proxy.recent
      .slice(0, 12)
      .map((f) => f.kind)
      .join(',');
  };
  const a = await kinds(42);
  const b = await kinds(42);
  const c = await kinds(43);
  t.is(a, b);
  t.not(a, c);
  t.regex(a, /^((delay|split),?)+$/);
});

test('random faults pick live connections only; with none, they are counted as missed', async (t) => {
  const { proxy, pairs } = await rig(t, 2, { seed: 7, every: 15, kinds: ['cut'] });
  await eventually(() => pairs.every((p) => p.device.closed && p.server.closed), 3000, 'both cut');
  await eventually(() => proxy.missed >= 2, 3000, 'later faults find nothing');
  t.is(proxy.injected.cut, 2, 'one cut per connection, never a dead one');
});

test('calm() ends faults in progress and releases held bytes; close() stops everything and refuses new connections', async (t) => {
  const { proxy, pairs } = await rig(t, 2, { seed: 3, every: 0 });
  proxy.delay(5000, 10_000);
  pairs[0].device.socket.write('held');
  await eventually(() => proxy.held === 1, 2000, 'the chunk is held');
  pairs[0].device.socket.write(' then this');
  await eventually(() => proxy.held === 2, 2000, 'held behind it');
  const t0 = Date.now();
  proxy.calm();
  await eventually(() => pairs[0].server.text === 'held then this', 2000, 'released at once, in order');
  t.true(Date.now() - t0 < 2000);
  t.is(proxy.held, 0);
  t.is(proxy.live, 2);
  await proxy.close();
  await eventually(() => pairs.every((p) => p.device.closed && p.server.closed), 2000, 'close cuts every connection');
  t.is(proxy.live, 0);
  const refused = await new Promise<boolean>((r) => {
    const s = net.connect({ port: proxy.port || 1, host: '127.0.0.1' });
    s.once('error', () => r(true));
    s.once('connect', () => {
      s.destroy();
      r(false);
    });
  });
  t.true(refused);
});

test('a target that refuses: the device side is closed', async (t) => {
  const spare = net.createServer();
  await new Promise<void>((r) => spare.listen(0, '127.0.0.1', () => r()));
  const port = (spare.address() as net.AddressInfo).port;
  await new Promise<void>((r) => spare.close(() => r()));
  const proxy = await ChaosProxy.start({ targetPort: port });
  t.teardown(() => proxy.close());
  const s = new End(net.connect({ port: proxy.port, host: '127.0.0.1' }));
  await eventually(() => s.closed, 2000, 'closed');
  t.is(proxy.live, 0);
});

test('bad options are refused with a message naming them', async (t) => {
  await t.throwsAsync(ChaosProxy.start({ targetPort: 0 }), { message: /targetPort/ });
  await t.throwsAsync(ChaosProxy.start({ targetPort: 1, kinds: [] }), { message: /kinds/ });
  await t.throwsAsync(ChaosProxy.start({ targetPort: 1, every: -1 }), { message: /every/ });
});
