/**
 * Persistence (`persist`): accepted qos messages, message ids, the duplicate
 * ring and unread lines survive a restart of the server; and, with a real
 * SIGKILL of a server process, 1,000 messages in flight arrive exactly once.
 */
import test, { ExecutionContext } from 'ava';
import { ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client, Server, ServerOptions, silentLogger } from '../src';
import { eventually, RawPeer } from './helpers/raw';

const T = 600;
const ROOT = path.join(__dirname, '..');
const BIN = path.join(ROOT, 'bin', 'tether.js');

function tmpdir(t: ExecutionContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-persist-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function start(t: ExecutionContext, dir: string, opts: ServerOptions = {}): Promise<Server> {
  const s = await Server.listen({ host: '127.0.0.1', port: 0, timeout: T, settleDelay: 0, logger: silentLogger, persist: dir, ...opts });
  t.teardown(() => s.close());
  return s;
}

async function device(t: ExecutionContext, port: number, id: string, extra = '\n'): Promise<RawPeer> {
  const p = await RawPeer.hello(port, id, extra);
  const ka = setInterval(() => p.send('\n'), T / 4);
  t.teardown(() => {
    clearInterval(ka);
    p.close();
  });
  return p;
}

test('accepted messages survive a restart and are sent with the id counter carried on (no mid 0)', async (t) => {
  const dir = tmpdir(t);
  const a = await start(t, dir);
  const d1 = await device(t, a.port, 'keeper');
  const c1 = await a.clientConn('keeper');
  const w = c1.write('first');
  t.is((await d1.next()).line, '00first');
  d1.send('00\n');
  await w;
  d1.close();
  await eventually(() => !c1.isUp);
  // The device is away; the app queues three more, durably.
  for (const m of ['two', 'three', 'four']) await c1.write(m, { accepted: true });
  await a.close();

  const b = await start(t, dir);
  const d2 = await device(t, b.port, 'keeper');
  t.is((await d2.next()).line, '01two', 'continues at mid 01 after the restart');
  d2.send('01\n');
  t.is((await d2.next()).line, '02three');
  d2.send('02\n');
  t.is((await d2.next()).line, '03four');
  d2.send('03\n');
  const c2 = await b.clientConn('keeper');
  await eventually(() => c2.inFlight === 0 && c2.queuedWrites === 0, 5000, 'all ACKed');
});

test('a message sent but not ACKed before the restart is resent under the same id', async (t) => {
  const dir = tmpdir(t);
  const a = await start(t, dir);
  const d1 = await device(t, a.port, 'resend');
  const c1 = await a.clientConn('resend');
  void c1.write('payload', { accepted: true });
  t.is((await d1.next()).line, '00payload');
  await a.close(); // no ACK reached the server
  const b = await start(t, dir);
  const d2 = await device(t, b.port, 'resend');
  t.is((await d2.next()).line, '00payload', 'same id: the device drops it if it had it');
  d2.send('00\n');
});

test('the duplicate ring and unread lines survive a restart', async (t) => {
  const dir = tmpdir(t);
  const a = await start(t, dir);
  const d1 = await device(t, a.port, 'sender');
  const c1 = await a.clientConn('sender');
  d1.send('01one\n02two\n03three\n');
  await d1.until((l) => l.includes('03'));
  t.is(await c1.readline(), 'one\n', 'the app took one line before the restart');
  await a.close();

  const b = await start(t, dir);
  const d2 = await device(t, b.port, 'sender');
  const c2 = await b.clientConn('sender');
  // The device did not hear the ACK of 03 and sends it again, then a new one.
  d2.send('03three\n04four\n');
  await d2.until((l) => l.includes('04'));
  t.deepEqual([await c2.readline(), await c2.readline(), await c2.readline()], ['two\n', 'three\n', 'four\n']);
  t.is(c2.counters.duplicatesDropped, 1, '03 was recognised by the restored ring');
  t.is(c2.buffered, 0);
});

test('the journal is compacted and stays small', async (t) => {
  const dir = tmpdir(t);
  const s = await start(t, dir, { persist: { dir, compactEvery: 50 } });
  const d = await device(t, s.port, 'busy');
  const c = await s.clientConn('busy');
  for (let i = 0; i < 200; i++) {
    const w = c.write(`m${i}`);
    const line = (await d.next()).line;
    d.send(line.slice(0, 2) + '\n');
    await w;
  }
  const size = fs.statSync(path.join(dir, 'busy.jsonl')).size;
  t.true(size < 4000, `journal is ${size} bytes after 200 messages`);
});

test('journaled Connections exist from the start: their unread lines are readable and their queue waits for the device', async (t) => {
  const dir = tmpdir(t);
  const a = await start(t, dir);
  const d1 = await device(t, a.port, 'early');
  const c1 = await a.clientConn('early');
  d1.send('00one\n01two\n');
  await d1.until((l) => l.includes('01'));
  await c1.write('for later', { accepted: true });
  d1.close();
  await a.close();

  const b = await start(t, dir);
  const c2 = b.get('early');
  t.truthy(c2, 'there before the device connects');
  t.is(c2!.state, 'down');
  t.deepEqual(b.connections().map((c) => c.id), ['early']);
  t.deepEqual([await c2!.readline(), await c2!.readline()], ['one\n', 'two\n']);
  const d2 = await device(t, b.port, 'early');
  const line = (await d2.next()).line;
  t.is(line, '00for later', 'nothing had gone out before the restart, so the counter is still at 0');
  d2.send(line.slice(0, 2) + '\n');
  await eventually(() => c2!.inFlight === 0 && c2!.queuedWrites === 0, 5000, 'ACKed');
  t.is(b.store!.stats().degraded, 0);
});

test('a Connection retired by its app deletes its journal; a later start does not bring it back', async (t) => {
  const dir = tmpdir(t);
  const a = await start(t, dir);
  const d = await device(t, a.port, 'gone');
  const c = await a.clientConn('gone');
  d.send('00bye\n');
  await d.until((l) => l.includes('00'));
  t.true(fs.existsSync(path.join(dir, 'gone.jsonl')));
  c.close();
  t.false(fs.existsSync(path.join(dir, 'gone.jsonl')));
  await a.close();
  const b = await start(t, dir);
  t.is(b.get('gone'), undefined);
});

// ---- a real crash ---------------------------------------------------------

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

function serve(config: string, marker: string): { proc: ChildProcess; up: Promise<void>; exited: Promise<unknown> } {
  const proc = spawn(process.execPath, [BIN, 'serve', '--config', config], {
    cwd: ROOT,
    env: { ...process.env, BURST_MARKER: marker },
  });
  let out = '';
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (out += d));
  const exited = new Promise((r) => proc.once('exit', r));
  const up = new Promise<void>((resolve, reject) => {
    proc.stdout!.on('data', () => out.includes('listening') && resolve());
    void exited.then(() => reject(new Error(`server exited: ${out}`)));
  });
  return { proc, up, exited };
}

async function crashRun(t: ExecutionContext, persist: boolean): Promise<{ got: number[]; killedAt: number }> {
  const dir = tmpdir(t);
  const port = await freePort();
  const marker = path.join(dir, 'marker');
  const config = path.join(dir, 'tether.json');
  fs.writeFileSync(
    config,
    JSON.stringify({
      host: '127.0.0.1',
      port,
      timeout: T,
      settleDelay: 0,
      maxQueuedWrites: 2000,
      persist: persist ? path.join(dir, 'journal') : null,
      apps: [{ script: path.join(ROOT, 'test', 'fixtures', 'burst-app.ts'), clients: ['victim'] }],
      log: { level: 'info', format: 'pretty' },
      http: null,
    }),
  );
  let server = serve(config, marker);
  t.teardown(() => server.proc.kill('SIGKILL'));
  await server.up;
  const client = new Client({ id: 'victim', port, timeout: T, reconnectDelay: 100, retryMin: 100, retryMax: 400 });
  t.teardown(() => client.close());
  await client.connect();
  const got: number[] = [];
  let killedAt = -1;
  const reader = (async () => {
    for (;;) {
      got.push(Number(await client.readline()));
      if (got.length === 300 && killedAt < 0) {
        killedAt = got.length;
        server.proc.kill('SIGKILL');
      }
    }
  })();
  reader.catch(() => {});
  await eventually(() => killedAt > 0, 30_000, '300 messages before the kill');
  await server.exited;
  t.true(fs.existsSync(marker), 'all 1,000 were accepted before the kill');
  server = serve(config, marker);
  await server.up;
  if (persist) {
    await eventually(() => got.length >= 1000, 30_000, 'all 1,000 delivered after the restart');
  } else {
    await eventually(() => client.isUp && client.connects >= 2, 30_000, 'reconnected to the restarted server');
    await new Promise((r) => setTimeout(r, 4 * T)); // give lost messages every chance to (wrongly) show up
  }
  return { got, killedAt };
}

test('persistence on: SIGKILL with 1,000 qos messages in flight, restart: every message arrives exactly once, in order', async (t) => {
  const { got } = await crashRun(t, true);
  t.deepEqual(got, Array.from({ length: 1000 }, (_, i) => i));
});

test('persistence off (documented): SIGKILL loses the messages not yet delivered, and never doubles one', async (t) => {
  const { got } = await crashRun(t, false);
  t.true(got.length < 1000, `received ${got.length} of 1000: the rest died with the process`);
  t.deepEqual(got, Array.from({ length: got.length }, (_, i) => i), 'what did arrive is an exact prefix, once each');
  t.log(`received ${got.length} of 1000 before the kill; nothing after the restart`);
});
