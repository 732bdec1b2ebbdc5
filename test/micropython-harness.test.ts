/**
 * Self-test of the MicroPython harness (test/helpers/micropython.ts) and its
 * board stand-ins, with real TCP on 127.0.0.1. Waits are on conditions, with
 * generous bounds, never on fixed sleeps.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { eventually } from './helpers/wait';
import { startMicroPython, PythonError, type MicroPython } from './helpers/micropython';

const EINPROGRESS = 115;
const EAGAIN = 11;
const EINVAL = 22;
const ECONNRESET = 104;
const ECONNREFUSED = 111;
const POLLIN = 1;
const POLLOUT = 4;
const POLLERR = 8;
const POLLHUP = 16;

const until = (what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 10_000) => eventually(cond, timeoutMs, what);

/** Echoes what it gets; ends the connection after echoing a chunk that completes "bye". */
async function echoServer() {
  const conns = new Set<net.Socket>();
  const server = net.createServer((s) => {
    conns.add(s);
    let seen = '';
    s.on('close', () => conns.delete(s));
    s.on('error', () => {});
    s.on('data', (d) => {
      s.write(d);
      seen += d.toString('latin1');
      if (seen.includes('bye')) s.end();
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    server,
    conns,
    port: (server.address() as net.AddressInfo).port,
    async close() {
      for (const c of conns) c.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}

/** A port on 127.0.0.1 with nothing listening (bound once, then released). */
async function closedPort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

// Python used by several tests: a bounded wait for poll flags, yielding to the event loop.
const PY_COMMON = `
import asyncio, socket, select, errno

async def wait_poll(s, mask, tries=2000):
    p = select.poll()
    p.register(s, mask)
    for _ in range(tries):
        r = p.poll(0)
        if r:
            return r[0][1]
        await asyncio.sleep_ms(5)
    return 0

def dial(port):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(socket.getaddrinfo('127.0.0.1', port)[0][-1])
    except OSError as e:
        return s, e.args[0]
    return s, None
`;

async function withMp(opts: Parameters<typeof startMicroPython>[0] = {}): Promise<MicroPython> {
  const mp = await startMicroPython(opts);
  await mp.run(PY_COMMON);
  return mp;
}

test('non-blocking client: EINPROGRESS, POLLOUT, write, readinto, EOF', async (t) => {
  const srv = await echoServer();
  const mp = await withMp();
  try {
    await mp.run(`
async def echo_flow(port):
    log = {}
    s, e = dial(port)
    log['connect_errno'] = e
    log['sockets_after_connect'] = None
    log['pollout'] = await wait_poll(s, select.POLLOUT)
    buf = bytearray(3)
    log['readinto_before_data'] = s.readinto(buf)
    log['write'] = s.write(b'hello')
    got = b''
    sizes = []
    for _ in range(2000):
        n = s.readinto(buf)
        if n:
            sizes.append(n)
            got += buf[:n]
        if len(got) >= 5:
            break
        await asyncio.sleep_ms(5)
    log['echo'] = got
    log['max_chunk'] = max(sizes)
    s.write(b'bye')
    tail = b''
    n = None
    for _ in range(2000):
        n = s.readinto(buf)
        if n == 0:
            break
        if n:
            tail += buf[:n]
        else:
            await asyncio.sleep_ms(5)
    log['tail'] = tail
    log['eof'] = n
    log['poll_at_eof'] = await wait_poll(s, select.POLLIN | select.POLLOUT)
    try:
        s.write(b'more')
        log['write_after_eof'] = 'no error'
    except OSError as e:
        log['write_after_eof'] = e.args[0]
    s.close()
    s.close()
    return log
`);
    const log = (await mp.call('echo_flow', srv.port)) as Record<string, unknown>;
    t.is(log.connect_errno, EINPROGRESS);
    t.is(log.pollout, POLLOUT);
    t.is(log.readinto_before_data, null);
    t.is(log.write, 5);
    t.deepEqual(log.echo, Buffer.from('hello'));
    t.true((log.max_chunk as number) <= 3, 'readinto never fills more than len(buf)');
    t.deepEqual(log.tail, Buffer.from('bye'));
    t.is(log.eof, 0);
    t.is(log.poll_at_eof, POLLIN | POLLHUP);
    t.is(log.write_after_eof, ECONNRESET);
    t.is(mp.sockets(), 0);
  } finally {
    await mp.close();
    await srv.close();
  }
});

test('connecting to a closed port: POLLERR|POLLHUP, then ECONNREFUSED / ECONNRESET', async (t) => {
  const port = await closedPort();
  const mp = await withMp();
  try {
    await mp.run(`
async def refused(port):
    log = {}
    s, e = dial(port)
    log['connect_errno'] = e
    log['poll'] = await wait_poll(s, select.POLLOUT)
    for name, op in (('readinto', lambda: s.readinto(bytearray(8))), ('write', lambda: s.write(b'x')), ('send', lambda: s.send(b'x'))):
        try:
            log[name] = ('returned', op())
        except OSError as e:
            log[name] = e.args[0]
    s.close()
    return log
`);
    const log = (await mp.call('refused', port)) as Record<string, unknown>;
    t.is(log.connect_errno, EINPROGRESS);
    t.is(log.poll, POLLERR | POLLHUP);
    t.is(log.readinto, ECONNREFUSED);
    t.is(log.write, ECONNRESET);
    t.is(log.send, ECONNRESET);
    t.is(mp.sockets(), 0);
  } finally {
    await mp.close();
  }
});

test('a reset by the peer: buffered bytes first, then POLLERR|POLLHUP and ECONNRESET', async (t) => {
  let peer: net.Socket | null = null;
  const server = net.createServer((s) => {
    peer = s;
    s.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as net.AddressInfo).port;
  const mp = await withMp();
  try {
    await mp.run(`
async def connect_only(port):
    global s
    s, e = dial(port)
    return await wait_poll(s, select.POLLOUT)

async def after_reset():
    log = {}
    log['poll'] = await wait_poll(s, select.POLLOUT | select.POLLIN)
    buf = bytearray(16)
    log['data'] = bytes(buf[:s.readinto(buf)])
    for name, op in (('readinto', lambda: s.readinto(buf)), ('write', lambda: s.write(b'x'))):
        try:
            log[name] = ('returned', op())
        except OSError as e:
            log[name] = e.args[0]
    s.close()
    return log
`);
    t.is(await mp.call('connect_only', port), POLLOUT);
    await until('the server to accept', () => peer !== null);
    const p = peer as unknown as net.Socket;
    p.write('last words');
    await until('the bytes to reach the interpreter', async () => ((await mp.eval('s.ioctl(3, 1)')) as number) === POLLIN);
    p.resetAndDestroy();
    await until('the reset to reach the interpreter', async () => (((await mp.eval('s.ioctl(3, 4)')) as number) & POLLERR) !== 0);
    const log = (await mp.call('after_reset')) as Record<string, unknown>;
    t.is(log.poll, POLLIN | POLLERR | POLLHUP);
    t.deepEqual(log.data, Buffer.from('last words'));
    t.is(log.readinto, ECONNRESET);
    t.is(log.write, ECONNRESET);
  } finally {
    await mp.close();
    await new Promise((r) => server.close(r));
  }
});

test('recv/send raise EAGAIN where write/readinto return None; blocking I/O is refused', async (t) => {
  const srv = await echoServer();
  const mp = await withMp();
  try {
    await mp.run(`
async def recv_send(port):
    log = {}
    b = socket.socket()
    try:
        b.connect(('127.0.0.1', port))
    except OSError as e:
        log['blocking_connect'] = [e.args[0], 'setblocking(False)' in e.args[1]]
    b.close()
    s, e = dial(port)
    for name, op in (('write_connecting', lambda: s.write(b'x')), ('send_connecting', lambda: s.send(b'x')), ('recv_empty', lambda: s.recv(10))):
        try:
            log[name] = ('returned', op())
        except OSError as e:
            log[name] = e.args[0]
    await wait_poll(s, select.POLLOUT)
    log['send'] = s.send(b'abc')
    await wait_poll(s, select.POLLIN)
    log['recv'] = s.recv(10)
    s.send(b'bye')
    data = b''
    for _ in range(2000):
        try:
            d = s.recv(10)
        except OSError as e:
            if e.args[0] != errno.EAGAIN:
                raise
            await asyncio.sleep_ms(5)
            continue
        if d == b'':
            break
        data += d
    log['recv_until_eof'] = data
    log['recv_at_eof'] = s.recv(10)
    log['read_at_eof'] = s.read()
    s.close()
    try:
        s.recv(1)
    except OSError as e:
        log['recv_after_close'] = e.args[0]
    return log
`);
    const log = (await mp.call('recv_send', srv.port)) as Record<string, unknown>;
    t.deepEqual(log.blocking_connect, [EINVAL, true]);
    t.deepEqual(log.write_connecting, ['returned', null]);
    t.is(log.send_connecting, EAGAIN);
    t.is(log.recv_empty, EAGAIN);
    t.is(log.send, 3);
    t.deepEqual(log.recv, Buffer.from('abc'));
    t.deepEqual(log.recv_until_eof, Buffer.from('bye'));
    t.deepEqual(log.recv_at_eof, Buffer.alloc(0));
    t.deepEqual(log.read_at_eof, Buffer.alloc(0));
    t.is(log.recv_after_close, 9); // EBADF
  } finally {
    await mp.close();
    await srv.close();
  }
});

test('a peer that stops reading fills the send buffer: write gives None, POLLOUT stops', async (t) => {
  let received = 0;
  let peer: net.Socket | null = null;
  const server = net.createServer((s) => {
    peer = s;
    s.pause();
    s.on('data', (d) => (received += d.length));
    s.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as net.AddressInfo).port;
  const mp = await withMp();
  try {
    await mp.run(`
chunk = bytes(range(256)) * 256  # 64 KiB
async def fill(port):
    global s
    s, e = dial(port)
    await wait_poll(s, select.POLLOUT)
    total = 0
    partial = False
    blocked = False
    for _ in range(1024):  # at most 64 MiB
        n = s.write(chunk)
        if n is None:
            blocked = True
            break
        total += n
        if n < len(chunk):
            partial = True
        await asyncio.sleep_ms(0)
    p = select.poll()
    p.register(s, select.POLLOUT)
    return [total, partial, blocked, p.poll(0)]

async def drain():
    await wait_poll(s, select.POLLOUT)
    s.close()
`);
    const [total, , blocked, pollWhileFull] = (await mp.call('fill', port)) as [number, boolean, boolean, unknown[]];
    t.true(blocked, 'write returned None once the buffer was full');
    t.deepEqual(pollWhileFull, [], 'no POLLOUT while the send buffer is full');
    t.true(total > 64 * 1024);
    (peer as net.Socket | null)?.resume();
    await mp.call('drain');
    await until('all accepted bytes to arrive', () => received === total, 20_000);
    t.is(received, total);
  } finally {
    await mp.close();
    await new Promise((r) => server.close(r));
  }
});

test('network stub: auto-join, link down, connect() waits for the link, disconnect', async (t) => {
  const mp = await withMp({ wifi: { connectDelayMs: 20 } });
  try {
    await mp.run(`
import network
w = network.WLAN(network.STA_IF)
`);
    t.false(await mp.eval('w.active()'));
    t.false(await mp.eval('w.isconnected()'));
    await mp.run('w.active(True)');
    await until('auto-join with stored credentials', async () => (await mp.eval('w.isconnected()')) === true);
    t.is(await mp.eval('w.status()'), 1010);
    t.is(mp.wifi.connects, 0);
    t.true(mp.wifi.connected);

    mp.wifi.setUp(false);
    t.false(await mp.eval('w.isconnected()'));
    await mp.run("w.connect('ap', 'secret')");
    t.is(mp.wifi.connects, 1);
    t.is(await mp.eval("w.config('ssid')"), 'ap');
    // Many join delays later, still not joined: the link is down.
    await new Promise((r) => setTimeout(r, 300));
    t.false(await mp.eval('w.isconnected()'));
    t.is(await mp.eval('w.status()'), 201);

    mp.wifi.setUp(true);
    await until('join once the link is back', async () => (await mp.eval('w.isconnected()')) === true);
    t.deepEqual(await mp.eval('w.ifconfig()[0]'), '127.0.0.1');

    await mp.run('w.disconnect()');
    t.is(mp.wifi.disconnects, 1);
    await new Promise((r) => setTimeout(r, 300));
    t.false(await mp.eval('w.isconnected()'), 'no rejoin after an explicit disconnect');

    await mp.run('w.active(False)');
    const err = await t.throwsAsync(mp.run("w.connect('ap', 'secret')"), { instanceOf: PythonError });
    t.is(err?.type, 'OSError');
    t.is(mp.wifi.connects, 1, 'a refused connect() is not counted');
  } finally {
    await mp.close();
  }
});

test('network stub: without stored credentials only connect() joins', async (t) => {
  const mp = await withMp({ wifi: { storedCredentials: false, up: false } });
  try {
    await mp.run('import network\nw = network.WLAN(network.STA_IF)\nw.active(True)');
    await new Promise((r) => setTimeout(r, 200));
    t.false(await mp.eval('w.isconnected()'));
    mp.wifi.setUp(true);
    await new Promise((r) => setTimeout(r, 200));
    t.false(await mp.eval('w.isconnected()'), 'no stored credentials: nothing to join with');
    await mp.run("w.connect('ap', 'pw')");
    await until('join after connect()', async () => (await mp.eval('w.isconnected()')) === true);
    t.is(mp.wifi.connects, 1);
  } finally {
    await mp.close();
  }
});

test('machine stub: pin toggles, WDT feeds, Timer, unique_id, reset', async (t) => {
  const mp = await withMp({ uniqueId: 'a1b2c3d4e5f6' });
  try {
    await mp.run(`
import machine
led = machine.Pin(2, machine.Pin.OUT)
for _ in range(5):
    led.on()
    led.off()
led(1)
led.value(1)
wdt = machine.WDT(timeout=20000)
for _ in range(3):
    wdt.feed()
ticks = 0
def tick(timer):
    global ticks
    ticks += 1
tm = machine.Timer(-1)
tm.init(period=5, mode=machine.Timer.PERIODIC, callback=tick)
`);
    t.deepEqual(mp.pins['2'], { value: 1, writes: 12, toggles: 11 });
    t.is(await mp.eval('led.value()'), 1);
    t.is(mp.wdtFeeds.length, 3);
    t.is(mp.wdtTimeoutMs, 20000);
    t.true(mp.wdtFeeds.every((x, i) => i === 0 || x >= mp.wdtFeeds[i - 1]));
    await until('the periodic timer to fire 3 times', async () => ((await mp.eval('ticks')) as number) >= 3);
    await mp.run('tm.deinit()\nstopped_at = ticks');
    t.deepEqual(await mp.eval('machine.unique_id()'), Buffer.from('a1b2c3d4e5f6', 'hex'));
    const err = await t.throwsAsync(mp.run('machine.reset()'), { instanceOf: PythonError });
    t.is(err?.type, 'SystemExit');
    t.deepEqual(mp.resets, ['reset']);
    // The interpreter is still usable after a "reset" (a test decides what a reset means).
    t.is(await mp.eval('1 + 1'), 2);
  } finally {
    await mp.close();
  }
});

test('call/eval marshal values both ways and report Python errors', async (t) => {
  const mp = await withMp({ files: { 'extra_mod.py': 'X = 5\n', '/data/note.txt': 'hi' } });
  try {
    await mp.run(`
def echo(*a):
    return [a, len(a)]
async def later(x):
    await asyncio.sleep_ms(1)
    return {'x': x, 'b': bytes([x])}
def boom():
    raise OSError(errno.ECONNRESET)
`);
    t.deepEqual(await mp.call('echo', 1, 'two', null, true, [1.5], { k: Buffer.from([0, 255]) }), [
      [1, 'two', null, true, [1.5], { k: Buffer.from([0, 255]) }],
      6,
    ]);
    t.deepEqual(await mp.call('later', 7), { x: 7, b: Buffer.from([7]) });
    t.deepEqual(await mp.eval('later(8)'), { x: 8, b: Buffer.from([8]) });
    t.is(await mp.call('errno.errorcode.get', ECONNRESET), 'ECONNRESET');
    t.is(await mp.eval("__import__('extra_mod').X"), 5);
    t.is(await mp.eval("open('/data/note.txt').read()"), 'hi');
    const err = await t.throwsAsync(mp.call('boom'), { instanceOf: PythonError });
    t.is(err?.type, 'OSError');
    t.regex(err?.message ?? '', /ECONNRESET|104/);
    await t.throwsAsync(mp.call('no_such_function'), { instanceOf: PythonError });

    await mp.run("print('line one')\nprint('ready', 42)");
    t.is(await mp.waitForLine(/^ready/), 'ready 42');
    t.true(mp.stdout.includes('line one'));
  } finally {
    await mp.close();
  }
});

test('client files are copied into /lib (and examples into /lib/examples)', async (t) => {
  const dir = path.resolve(__dirname, '../clients/micropython');
  const list = (d: string) => (fs.existsSync(d) ? fs.readdirSync(d).filter((n) => n.endsWith('.py')).sort() : []);
  const mp = await withMp();
  try {
    const lib = (await mp.eval("__import__('os').listdir('/lib')")) as string[];
    for (const stub of ['socket.py', 'network.py', 'machine.py']) t.true(lib.includes(stub), stub);
    for (const f of list(dir)) t.true(lib.includes(f), f);
    const examples = list(path.join(dir, 'examples'));
    if (examples.length > 0) {
      t.deepEqual(((await mp.eval("__import__('os').listdir('/lib/examples')")) as string[]).sort(), examples);
    }
  } finally {
    await mp.close();
  }
  const none = await withMp({ clientDir: null });
  try {
    const lib = (await none.eval("__import__('os').listdir('/lib')")) as string[];
    t.deepEqual(lib.filter((n) => !n.startsWith('_')).sort(), ['machine.py', 'network.py', 'socket.py']);
  } finally {
    await none.close();
  }
});

test('two interpreters side by side share no state', async (t) => {
  const srv = await echoServer();
  const [a, b] = await Promise.all([withMp(), withMp()]);
  try {
    await a.run(`
import machine, network
only_in_a = 1
machine.Pin(5, machine.Pin.OUT).on()
machine.WDT().feed()
`);
    t.false(await b.eval("'only_in_a' in globals()"));
    t.deepEqual(Object.keys(b.pins), []);
    t.is(b.wdtFeeds.length, 0);
    t.is(a.pins['5']?.toggles, 1);
    t.notDeepEqual(await a.eval('machine.unique_id()'), await b.eval("__import__('machine').unique_id()"));

    // WiFi down in A only.
    a.wifi.setUp(false);
    await b.run("import network\nw = network.WLAN(network.STA_IF)\nw.active(True)");
    await until('B joins while A is down', async () => (await b.eval('w.isconnected()')) === true);
    t.false(a.wifi.up);
    t.true(b.wifi.up);

    // Both talk to the server at once, each on its own sockets.
    const script = `
async def talk(port, word):
    s, e = dial(port)
    await wait_poll(s, select.POLLOUT)
    s.write(word)
    buf = bytearray(32)
    got = b''
    for _ in range(2000):
        n = s.readinto(buf)
        if n:
            got += buf[:n]
        if len(got) >= len(word):
            break
        await asyncio.sleep_ms(5)
    return [got, s]
`;
    await Promise.all([a.run(script), b.run(script)]);
    const [ra, rb] = (await Promise.all([a.call('talk', srv.port, Buffer.from('from-a')), b.call('talk', srv.port, Buffer.from('from-b'))])) as [
      [Buffer, unknown],
      [Buffer, unknown],
    ];
    t.deepEqual(ra[0], Buffer.from('from-a'));
    t.deepEqual(rb[0], Buffer.from('from-b'));
    t.is(a.sockets(), 1);
    t.is(b.sockets(), 1);
    await until('both connections at the server', () => srv.conns.size === 2);

    await a.close();
    await until('A’s connection to close at the server', () => srv.conns.size === 1);
    t.is(b.sockets(), 1);
    t.is(await b.eval('1 + 2'), 3, 'B keeps running after A is closed');
  } finally {
    await a.close();
    await b.close();
    await srv.close();
  }
});

test.serial('close() ends every socket and timer, even ones the code left open', async (t) => {
  const srv = await echoServer();
  const before = process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap').length;
  const mp = await withMp();
  await mp.run(`
import machine
async def open_some(port):
    global socks
    socks = []
    for _ in range(3):
        s, e = dial(port)
        await wait_poll(s, select.POLLOUT)
        socks.append(s)
    return len(socks)
t = machine.Timer(-1)
t.init(period=10, mode=machine.Timer.PERIODIC, callback=lambda _: None)
async def forever():
    while True:
        await asyncio.sleep_ms(20)
asyncio.create_task(forever())
`);
  t.is(await mp.call('open_some', srv.port), 3);
  t.is(mp.sockets(), 3);
  await until('3 connections at the server', () => srv.conns.size === 3);

  await mp.close();
  await mp.close(); // idempotent
  t.is(mp.sockets(), 0);
  await until('the server to see every connection closed', () => srv.conns.size === 0);
  await t.throwsAsync(mp.run('1'), { message: /closed/ });
  await srv.close();
  const after = process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap').length;
  t.true(after <= before, `TCP handles before ${before}, after ${after}`);
});
